""" CIFAR-10 for the study: decoded once into uint8 tensors, class-balanced splits, augmentation on
the device that holds the images (GPU or CPU), so no per-image PIL pipeline sits in the loop."""
import fcntl
import hashlib
import os
import shutil
import tarfile
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.data import create_dataset

__all__ = ['CIFAR10_SHA256', 'AUGMENTATIONS', 'load_cifar10', 'balanced_split', 'augment', 'cutout']


CIFAR10_SHA256 = '1fde636a137192241399fe9928af8c30ba7c867ca7901121faa671a7363be792'  # ../shared/data/README.md


def load_cifar10(data: str, cache_dir: str) -> Dict[str, torch.Tensor]:
    """``{'train_x', 'train_y', 'test_x', 'test_y'}``: uint8 ``(N, 3, 32, 32)`` images and int64 labels.

    ``data`` is ``cifar10-jpg.tar.gz`` (its sha256 is checked) or its unpacked ImageFolder root
    (``train/``, ``test/``); the decoded tensors are cached in ``cache_dir`` as safetensors.
    """
    cache = Path(cache_dir) / 'cifar10_uint8.safetensors'
    if cache.exists():
        return _checked(load_file(str(cache)), cache)
    # Workers that start together build the cache once: the first holds the lock, the others wait
    # for it and then read its cache (no one sees a half-extracted folder).
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.parent / '.cifar10.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if cache.exists():
            return _checked(load_file(str(cache)), cache)
        return _build_cache(Path(data), cache)


def _build_cache(root: Path, cache: Path) -> Dict[str, torch.Tensor]:
    if not root.exists():
        raise FileNotFoundError(f'CIFAR-10 not found at {root} (see ../shared/data/README.md)')
    if root.is_file():
        digest = hashlib.sha256(root.read_bytes()).hexdigest()
        if digest != CIFAR10_SHA256:
            raise ValueError(f'{root}: sha256 {digest} is not that of the CIFAR-10 archive ({CIFAR10_SHA256})')
        folder = cache.parent / 'images'
        if not folder.is_dir():  # extracted beside it and renamed: an interrupted extraction leaves no folder
            tmp = cache.parent / f'images.{os.getpid()}.tmp'
            shutil.rmtree(tmp, ignore_errors=True)
            with tarfile.open(root) as tar:
                tar.extractall(tmp, filter='data')
            os.replace(tmp, folder)
        root = folder
    out = {}
    for split in ('train', 'test'):
        # timm's ImageFolder reader: the same sorted class order as timm training on this folder.
        ds = create_dataset('', root=str(root / split), search_split=False)
        images, labels = [], []
        for img, label in ds:
            images.append(torch.frombuffer(bytearray(img.convert('RGB').tobytes()), dtype=torch.uint8).view(32, 32, 3))
            labels.append(label)
        out[f'{split}_x'] = torch.stack(images).permute(0, 3, 1, 2).contiguous()
        out[f'{split}_y'] = torch.tensor(labels, dtype=torch.int64)
    _checked(out, root)
    tmp = cache.with_name(f'{cache.name}.{os.getpid()}.tmp')
    save_file(out, str(tmp))
    os.replace(tmp, cache)
    return out


def _checked(data: Dict[str, torch.Tensor], source) -> Dict[str, torch.Tensor]:
    """Refuse anything but uint8 ``(N, 3, 32, 32)`` images with one int64 label in 0..9 each."""
    for split in ('train', 'test'):
        x, y = data.get(f'{split}_x'), data.get(f'{split}_y')
        if x is None or x.dtype != torch.uint8 or x.dim() != 4 or tuple(x.shape[1:]) != (3, 32, 32):
            got = 'missing' if x is None else f'{x.dtype} {tuple(x.shape)}'
            raise ValueError(f'{source}: {split}_x must be uint8 images of shape (N, 3, 32, 32), got {got}')
        if y is None or y.dtype != torch.int64 or tuple(y.shape) != (len(x),):
            got = 'missing' if y is None else f'{y.dtype} {tuple(y.shape)}'
            raise ValueError(f'{source}: {split}_y must be {len(x)} int64 labels, got {got}')
        if len(y) and (int(y.min()) < 0 or int(y.max()) > 9):
            raise ValueError(f'{source}: {split}_y holds labels outside 0..9')
    return data


def balanced_split(labels: torch.Tensor, per_class: int, generator: torch.Generator,
                   exclude: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``per_class`` indices of every class (none of ``exclude``), drawn with ``generator``,
    interleaved by class, so that every prefix of a multiple of 10 is class-balanced."""
    keep = torch.ones(len(labels), dtype=torch.bool)
    if exclude is not None:
        keep[exclude] = False
    chosen = []
    for c in range(int(labels.max()) + 1):
        idx = torch.nonzero((labels == c) & keep).flatten()
        if len(idx) < per_class:
            raise ValueError(f'class {c} has {len(idx)} images, {per_class} requested')
        chosen.append(idx[torch.randperm(len(idx), generator=generator)[:per_class]])
    return torch.stack(chosen, 1).flatten()


AUGMENTATIONS = ('crop_flip', 'flip', 'none')


def augment(x: torch.Tensor, g: torch.Generator, mode: str = 'crop_flip') -> torch.Tensor:
    """The CIFAR augmentation of a uint8 batch, on the batch's device; returns float images in [0, 1].

    ``crop_flip`` (standard): a random 32 px crop of the 4 px reflect-padded image, then a horizontal
    flip with probability 1/2; ``flip``: the flip alone; ``none``: the images as they are. ``g`` lives
    on the same device, so the draws do not depend on the host."""
    if mode not in AUGMENTATIONS:
        raise ValueError(f'unknown augmentation {mode!r}, expected one of {AUGMENTATIONS}')
    if mode == 'none':
        return x.float() / 255.0
    B, C, H, W = x.shape
    dev = x.device
    if mode == 'flip':
        flip = torch.rand(B, generator=g, device=dev) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(-1), x).float() / 255.0
    padded = F.pad(x.float(), (4, 4, 4, 4), mode='reflect')
    dy = torch.randint(0, 9, (B,), generator=g, device=dev)
    dx = torch.randint(0, 9, (B,), generator=g, device=dev)
    rows = (dy[:, None] + torch.arange(H, device=dev))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(W, device=dev))[:, None, None, :]
    out = padded[torch.arange(B, device=dev)[:, None, None, None], torch.arange(C, device=dev)[None, :, None, None],
                 rows, cols]
    flip = torch.rand(B, generator=g, device=dev) < 0.5
    out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out / 255.0


def cutout(x: torch.Tensor, size: int, g: torch.Generator, fill: float = 0.5) -> torch.Tensor:
    """Cutout (DeVries and Taylor 2017): one ``size`` x ``size`` square per image, centred anywhere
    (clipped at the border), set to ``fill`` (mid-grey of [0, 1] images, about the data mean)."""
    B, _, H, W = x.shape
    dev = x.device
    cy = torch.randint(0, H, (B,), generator=g, device=dev)[:, None, None]
    cx = torch.randint(0, W, (B,), generator=g, device=dev)[:, None, None]
    yy = torch.arange(H, device=dev)[None, :, None]
    xx = torch.arange(W, device=dev)[None, None, :]
    y0, x0 = cy - size // 2, cx - size // 2
    box = (yy >= y0) & (yy < y0 + size) & (xx >= x0) & (xx < x0 + size)
    return torch.where(box[:, None], torch.full_like(x, fill), x)
