""" Common image corruptions in the style of CIFAR-10-C / ImageNet-C, applied on the fly.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations" (ICLR 2019, https://arxiv.org/abs/1903.12261). The severity parameters are those
published for CIFAR-10-C; the implementations are batched torch versions (JPEG goes through
Pillow, as in CIFAR-10-C), so figures are comparable between runs of this package, close to but not
identical with the published CIFAR-10-C files.

Every function takes float images ``(B, C, H, W)`` in [0, 1] (before mean/std normalisation) and a
severity 1..5, and is deterministic for a given ``torch.Generator``.
"""
import io
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

__all__ = ['CORRUPTIONS', 'SEVERITIES', 'corrupt', 'check_corruptions', 'corruption_accuracy']

SEVERITIES = (1, 2, 3, 4, 5)

_PARAMS = {
    'gaussian_noise': [0.04, 0.06, 0.08, 0.09, 0.10],   # noise std
    'shot_noise': [500, 250, 100, 75, 50],               # photons per unit intensity
    'impulse_noise': [0.01, 0.02, 0.03, 0.05, 0.07],     # salt-and-pepper fraction
    'gaussian_blur': [0.4, 0.6, 0.7, 0.8, 1.0],          # sigma in pixels
    'contrast': [0.75, 0.5, 0.4, 0.3, 0.15],             # contrast factor
    'brightness': [0.05, 0.1, 0.15, 0.2, 0.3],           # added to HSV value
    'jpeg_compression': [80, 65, 58, 50, 40],            # JPEG quality
    'pixelate': [0.95, 0.9, 0.85, 0.75, 0.65],           # downsampling factor
}


def _gaussian_noise(x: Tensor, c: float, g: Optional[torch.Generator]) -> Tensor:
    return x + c * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)


def _shot_noise(x: Tensor, c: float, g: Optional[torch.Generator]) -> Tensor:
    return torch.poisson(x.clamp(0, 1) * c, generator=g) / c


def _impulse_noise(x: Tensor, c: float, g: Optional[torch.Generator]) -> Tensor:
    u = torch.rand(x.shape, generator=g, device=x.device)
    salt = torch.rand(x.shape, generator=g, device=x.device) < 0.5
    hit = u < c
    return torch.where(hit, salt.to(x.dtype), x)


def _gaussian_blur(x: Tensor, sigma: float, g: Optional[torch.Generator]) -> Tensor:
    radius = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    C = x.shape[1]
    pad = (radius, radius, radius, radius)
    y = F.pad(x, pad, mode='reflect')
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def _contrast(x: Tensor, c: float, g: Optional[torch.Generator]) -> Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * c + mean


def _brightness(x: Tensor, c: float, g: Optional[torch.Generator]) -> Tensor:
    # Adding c to HSV value keeps hue and saturation: scale RGB by new V / old V.
    v = x.amax(dim=1, keepdim=True)
    new_v = (v + c).clamp(max=1.0)
    return torch.where(v > 0, x * new_v / v.clamp_min(1e-8), new_v.expand_as(x))


def _jpeg_compression(x: Tensor, quality: float, g: Optional[torch.Generator]) -> Tensor:
    # Pillow's encoder, as CIFAR-10-C used; one image at a time on the CPU.
    u8 = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for img in u8:
        buf = io.BytesIO()
        Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(buf, 'JPEG', quality=int(quality))
        out.append(torch.from_numpy(np.array(Image.open(buf))).view(img.shape))
    return torch.stack(out).permute(0, 3, 1, 2).to(device=x.device, dtype=x.dtype) / 255


def _pixelate(x: Tensor, c: float, g: Optional[torch.Generator]) -> Tensor:
    H, W = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, int(H * c)), max(1, int(W * c))), mode='area')
    return F.interpolate(small, size=(H, W), mode='nearest')


CORRUPTIONS: Dict[str, Callable[[Tensor, float, Optional[torch.Generator]], Tensor]] = {
    'gaussian_noise': _gaussian_noise,
    'shot_noise': _shot_noise,
    'impulse_noise': _impulse_noise,
    'gaussian_blur': _gaussian_blur,
    'contrast': _contrast,
    'brightness': _brightness,
    'jpeg_compression': _jpeg_compression,
    'pixelate': _pixelate,
}


def corrupt(images: Tensor, name: str, severity: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Apply corruption ``name`` at ``severity`` (1..5) to float images ``(B, C, H, W)`` in [0, 1].

    Returns images of the same shape, dtype and device, clipped to [0, 1].
    """
    if name not in CORRUPTIONS:
        raise ValueError(f'unknown corruption {name!r}, expected one of {sorted(CORRUPTIONS)}')
    if severity not in SEVERITIES:
        raise ValueError(f'severity must be an integer from 1 to 5, got {severity!r}')
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f'expected float images (B, C, H, W), got {images.dtype} {tuple(images.shape)}')
    out = CORRUPTIONS[name](images, _PARAMS[name][severity - 1], generator)
    return out.clamp(0, 1).to(images.dtype)


def check_corruptions(corruptions: Optional[Sequence[str]], severities: Sequence[int]) -> Tuple[List[str], List[int]]:
    """The corruption names (None: all) and severities to run; ``ValueError`` naming what is unknown."""
    names = list(CORRUPTIONS) if corruptions is None else list(corruptions)
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown or not names:
        raise ValueError(f'unknown corruption(s) {unknown or names}, expected names from {sorted(CORRUPTIONS)}')
    bad = [s for s in severities if s not in SEVERITIES]
    if bad or not severities:
        raise ValueError(f'severities must be integers from 1 to 5, got {list(severities)}')
    return names, list(severities)


@torch.no_grad()
def corruption_accuracy(
        model: torch.nn.Module,
        loader: Iterable,
        corruptions: Optional[Sequence[str]] = None,
        severities: Sequence[int] = SEVERITIES,
        preprocess: Optional[Callable[[Tensor], Tensor]] = None,
        seed: int = 0,
        gather: Optional[Callable[[Tensor], Tensor]] = None,
) -> Dict[str, Any]:
    """Top-1 accuracy (%) of ``model`` on clean and corrupted copies of every batch of ``loader``.

    Args:
        model: a classifier; it is put in eval mode and its device receives the images.
        loader: yields ``(images, targets)``, images float ``(B, C, H, W)`` in [0, 1] (no normalisation).
        corruptions: names from ``CORRUPTIONS`` (default: all of them).
        severities: severities to apply, each 1..5.
        preprocess: maps [0, 1] images (on the model's device) to model input, e.g. mean/std
            normalisation; applied after the corruption.
        seed: the random corruptions of batch ``i`` use a generator seeded from ``(seed, i)``, so a
            run is repeatable for a given loader order and batch size.
        gather: combines the per-image hits of all processes, e.g. Accelerate's
            ``accelerator.gather_for_metrics`` (which also drops the padding of the last batch).

    Returns ``{'top1': clean, 'corruptions': {name: [top1 per severity]}, 'mean_per_corruption':
    {name: mean over severities}, 'mean_corruption_top1': mean over all (corruption, severity)}``.
    """
    names, sevs = check_corruptions(corruptions, severities)
    model.eval()
    device = next(model.parameters()).device
    preprocess = preprocess or (lambda x: x)
    stream_ids = [list(CORRUPTIONS).index(name) for name in names]
    hits_sum = None
    total = 0
    for i, (images, targets) in enumerate(loader):
        images = images.to(device)
        targets = targets.to(device)
        variants = [images]
        for name, stream in zip(names, stream_ids):
            for s in sevs:
                # One stream per (batch, corruption, severity): results do not depend on the order
                # or subset of corruptions evaluated.
                g = torch.Generator(device=images.device).manual_seed(((seed * 1_000_003 + i) * 64 + stream) * 8 + s)
                variants.append(corrupt(images, name, s, g))
        hits = torch.stack([model(preprocess(v)).argmax(-1) == targets for v in variants], dim=1).to(torch.uint8)
        if gather is not None:
            hits = gather(hits)
        hits_sum = hits.sum(0, dtype=torch.int64) if hits_sum is None else hits_sum + hits.sum(0, dtype=torch.int64)
        total += hits.shape[0]
    if not total:
        raise ValueError('the evaluation loader yielded no images')
    acc = (hits_sum.double() * 100.0 / total).tolist()
    per = {name: acc[1 + ci * len(sevs): 1 + (ci + 1) * len(sevs)] for ci, name in enumerate(names)}
    return {
        'top1': acc[0],
        'corruptions': per,
        'mean_per_corruption': {name: sum(v) / len(v) for name, v in per.items()},
        'mean_corruption_top1': sum(acc[1:]) / (len(acc) - 1),
        'num_images': total,
        'severities': sevs,
    }
