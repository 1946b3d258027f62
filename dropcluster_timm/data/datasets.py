""" Data sets and transforms: ImageFolder splits found by name, timm's data sets, the embedded digits
(``digits``).

Errors a user can fix (a missing folder, no held-out split, overlapping splits, class counts that
differ) raise ``InputError`` with a one-line reason.
"""
import io
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import Dataset

from timm.data import create_dataset, create_transform, resolve_data_config

from ..accelerate_state import is_main_process
from ..errors import InputError, classify
from .digits import EMBEDDED_DATASET, DigitsDataset

__all__ = [
    'EMBEDDED_DATASET', 'TRAIN_SPLITS', 'EVAL_SPLITS', 'DigitsDataset', 'DataBundle', 'num_classes_of', 'class_names',
    'is_folder_dataset', 'find_split_folder', 'make_dataset', 'build_data', 'set_transforms',
    'dataset_description', 'split_name', 'cluster_batch', 'check_no_link_loop', 'EightBitReader',
]

def num_classes_of(ds: Dataset) -> Optional[int]:
    """The class count a data set declares (``classes`` or its reader's ``class_to_idx``), if any."""
    if hasattr(ds, 'classes'):
        return len(ds.classes)
    reader = getattr(ds, 'reader', None)
    if reader is not None and getattr(reader, 'class_to_idx', None):
        return len(reader.class_to_idx)
    return None


# Folder names tried for a split after the name given: timm's synonyms, plus 'test' for evaluation.
# Unlike timm's folder search, the root itself is never a fallback: it holds every split, the
# training images included.
TRAIN_SPLITS = ('train', 'training')
EVAL_SPLITS = ('validation', 'val', 'valid', 'eval', 'evaluation', 'test')
_FOLDER_DATASETS = ('', 'folder', 'image_folder', 'imagefolder')


def is_folder_dataset(dataset: str, data_dir: Optional[str]) -> bool:
    """Whether ``dataset`` / ``data_dir`` name an ImageFolder root with one sub-folder per split."""
    return dataset.lower() in _FOLDER_DATASETS and data_dir is not None and os.path.isdir(data_dir)


def find_split_folder(data_dir: str, split: str, flag: str) -> str:
    """The folder of ``split`` in an ImageFolder root: ``data_dir/split``, else the first synonym
    present (``TRAIN_SPLITS`` or ``EVAL_SPLITS``, whichever holds ``split``).

    Raises ``InputError`` naming the folders found and ``flag`` (the option that names a split)
    when there is none; never returns ``data_dir`` itself.
    """
    path = os.path.join(data_dir, split)
    if os.path.isdir(path):
        return path
    for synonyms in (TRAIN_SPLITS, EVAL_SPLITS):
        if split in synonyms:
            for name in synonyms:
                if os.path.isdir(os.path.join(data_dir, name)):
                    return os.path.join(data_dir, name)
    found = sorted(d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d)))
    raise InputError(f'no {split!r} split folder in {data_dir} (folders found: {", ".join(found) or "none"}); '
                        f'name one with {flag}')


def make_dataset(dataset: str, data_dir: Optional[str], split: str, is_training: bool = False, transform=None,
                 flag: str = '--split', **dataset_args: Any) -> Dataset:
    """One split of a data set: the embedded digits (``dataset`` 'digits', or nothing given), a split
    folder of an ImageFolder root (``find_split_folder``), or timm's ``create_dataset`` (with
    ``dataset_args``: class_map, num_samples, download, ...). The data set gets a ``source``
    attribute: the folder (or ``dataset:split``) it was read from."""
    if not dataset and not data_dir:
        dataset = EMBEDDED_DATASET
    if dataset == EMBEDDED_DATASET:
        return DigitsDataset(split, transform)
    if data_dir is None or not os.path.exists(data_dir):
        raise InputError(f'data folder {data_dir!r} does not exist')
    root, search_split = data_dir, True
    folder = is_folder_dataset(dataset, data_dir)
    if folder:
        root, search_split = find_split_folder(data_dir, split, flag), False
        check_no_link_loop(root)
    try:
        ds = create_dataset(dataset, root=root, split=split, is_training=is_training, search_split=search_split,
                            **dataset_args)
    except Exception as e:  # a wrong name or folder (exit 2), or a download, the network or disk (exit 1)
        raise classify(e, f'cannot read data set {dataset or "ImageFolder"} split {split!r} in {root}') from e
    if folder:
        ds.reader = EightBitReader(ds.reader)
    if len(ds) == 0:
        raise InputError(f'data set split {split!r} in {root} is empty')
    ds.source = root if not search_split else f'{dataset}:{split}'
    if transform is not None:
        ds.transform = transform
    return ds


MAX_FOLDER_DEPTH = 64


def check_no_link_loop(root: str) -> None:
    """``InputError`` naming the link when a folder link under ``root`` leads back to a folder
    above it: timm's folder reader follows links and would walk such a tree forever."""
    def walk(path: str, above: frozenset, depth: int) -> None:
        if depth > MAX_FOLDER_DEPTH:
            raise InputError(f'{path}: folders nested more than {MAX_FOLDER_DEPTH} deep under {root}')
        try:
            entries = list(os.scandir(path))
        except OSError:
            return  # unreadable: timm's reader skips it too
        for entry in entries:
            if entry.is_dir(follow_symlinks=True):
                real = os.path.realpath(entry.path)
                if real in above:
                    raise InputError(f'{entry.path} links back to {real}, a folder above it: the image folder '
                                        'would be read forever; remove the link')
                walk(entry.path, above | {real}, depth + 1)

    walk(root, frozenset([os.path.realpath(root)]), 0)


# Modes PIL gives 16-bit PNGs (grayscale; 'I' in older Pillow), which convert('RGB') clips at 255, with
# the value that stands for white. PIL itself reduces 16-bit colour PNGs to 8 bits correctly.
_HIGH_BIT_MODES = {'I;16': 65535, 'I;16B': 65535, 'I;16L': 65535, 'I;16N': 65535, 'I': 65535}


class EightBitReader:
    """timm's folder reader with 16-bit images scaled to 8 bits: PIL's ``convert('RGB')``, which timm's
    ``ImageDataset`` applies, clips them instead (a 16-bit photograph turns almost white). 8-bit images
    pass through untouched."""

    def __init__(self, reader):
        self.reader = reader

    def __getattr__(self, name: str):
        if name == 'reader':  # not set yet (unpickling in a worker process)
            raise AttributeError(name)
        return getattr(self.reader, name)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int):
        f, target, *rest = self.reader[index]
        img = Image.open(f)  # reads the header only; a broken file raises OSError, which timm's retry takes
        white = _HIGH_BIT_MODES.get(img.mode)
        if white is None:
            f.seek(0)
            return (f, target, *rest)
        pixels = np.asarray(img, dtype=np.float64)
        scaled = Image.fromarray(np.clip(np.round(pixels * (255.0 / white)), 0, 255).astype(np.uint8), 'L')
        f.close()
        out = io.BytesIO()
        scaled.save(out, format='PNG')
        out.seek(0)
        return (out, target, *rest)


@dataclass
class DataBundle:
    """The splits of a run and what was learnt reading them."""
    train: Dataset
    eval: Dataset
    cluster: Dataset  # training images with the evaluation transform, for re-clustering
    num_classes: int
    data_config: Dict[str, Any]
    splits: Dict[str, str] = field(default_factory=dict)  # split -> folder (or dataset:split) it was read from


def dataset_description(dataset: str, data_dir: Optional[str]) -> Dict[str, str]:
    """How cards name the data set: ``dataset`` (shown), ``dataset_type``, and ``dataset_id`` only
    for a Hub data set (``hfds/org/name``); never a local path."""
    if dataset == EMBEDDED_DATASET or (not dataset and not data_dir):
        return {'dataset': 'scikit-learn handwritten digits', 'dataset_type': EMBEDDED_DATASET}
    if dataset.lower() in _FOLDER_DATASETS:
        return {'dataset': os.path.basename(os.path.realpath(data_dir)), 'dataset_type': 'imagefolder'}
    prefix, _, name = dataset.partition('/')
    if prefix.lower() in ('hfds', 'hfids') and name:
        return {'dataset': name, 'dataset_type': name, 'dataset_id': name}
    return {'dataset': name or dataset, 'dataset_type': name or dataset}


def build_data(dataset: str, data_dir: Optional[str], train_split: str = 'train', val_split: str = 'validation',
               num_classes: Optional[int] = None, dataset_args: Optional[Dict[str, Any]] = None,
               train_num_samples: Optional[int] = None, val_num_samples: Optional[int] = None) -> DataBundle:
    """Datasets from timm's factory (or the embedded digits), without transforms yet (``set_transforms``
    adds them once the model, which decides the input size and normalisation, exists). ``num_classes``
    is checked against the classes the data set declares, and used where it declares none.

    Refuses a validation split that is, contains or lies inside the training split's folder."""
    args = dict(dataset_args or {})
    train = make_dataset(dataset, data_dir, train_split, True, None, '--train-split', num_samples=train_num_samples,
                         **args)
    args.pop('repeats', None)  # the training split's epoch repeats only
    val = make_dataset(dataset, data_dir, val_split, False, None, '--val-split', num_samples=val_num_samples, **args)
    if is_folder_dataset(dataset, data_dir):
        t, v = os.path.realpath(train.source), os.path.realpath(val.source)
        if t == v or v.startswith(t + os.sep) or t.startswith(v + os.sep):
            raise InputError(f'the validation split {val.source} overlaps the training split {train.source}; '
                                'name a held-out folder with --val-split')
    cluster = make_dataset(dataset, data_dir, train_split, False, None, '--train-split', num_samples=train_num_samples,
                           **args)
    if is_folder_dataset(dataset, data_dir):
        check_folder_classes(train, val, bool(args.get('class_map')))
    n_train, n_val = num_classes_of(train), num_classes_of(val)
    if n_train is not None and n_val is not None and n_train != n_val:
        raise InputError(f'the train split has {n_train} classes but the validation split has {n_val}')
    if num_classes is not None and n_train is not None and num_classes != n_train:
        raise InputError(f'--num-classes {num_classes} does not match the data set, which has {n_train} classes')
    return DataBundle(train, val, cluster, n_train or num_classes, {},
                      splits={'train': train.source, 'validation': val.source})


MAX_EMPTY_FILES = 0.01  # share of a split's image files that may be empty (skipped) before a run stops


def _folder_report(ds: Dataset) -> Dict[str, Any]:
    """Class folders without images (timm's reader drops them) and empty image files of a split."""
    reader = ds.reader
    folders = [e.name for e in os.scandir(ds.source) if e.is_dir() and not e.name.startswith('.')]
    classes = set(reader.class_to_idx)
    return dict(empty_folders=sorted(f for f in folders if f not in classes),
                empty_files=[path for path, _ in reader.samples if os.path.getsize(path) == 0])


def class_names(ds: Dataset) -> Optional[list]:
    """The class names of a data set read by timm's folder reader, in label order; None otherwise."""
    mapping = getattr(getattr(ds, 'reader', None), 'class_to_idx', None)
    return [name for name, _ in sorted(mapping.items(), key=lambda kv: kv[1])] if mapping else None


def check_folder_classes(train: Dataset, val: Dataset, class_map: bool = False) -> None:
    """ImageFolder splits label images by the index of their class folder's name, so the splits must
    have the same class names (a validation ``c`` would be scored as training ``b``), at least two of
    them. Class folders without images and empty image files are reported once; past
    ``MAX_EMPTY_FILES`` of a split empty, the run stops."""
    t, v = train.reader.class_to_idx, val.reader.class_to_idx
    if t != v and not class_map:
        only_t, only_v = sorted(set(t) - set(v)), sorted(set(v) - set(t))
        what = (f'only in {train.source}: {only_t[:5]}; only in {val.source}: {only_v[:5]}' if only_t or only_v
                else 'the same names in another order')
        raise InputError(f'the training and validation splits have different classes ({what}); images are '
                            'labelled by class folder, so map both with --class-map FILE or fix the folders')
    if len(t) < 2:
        raise InputError(f'{train.source} holds {len(t)} class folder(s) with images: a classifier needs at '
                            'least two (one class trains to 100% and learns nothing)')
    for ds in (train, val):
        report = _folder_report(ds)
        if report['empty_folders'] and is_main_process():
            print(f'warning: {ds.source}: {len(report["empty_folders"])} class folder(s) hold no images and are not '
                  f'classes: {report["empty_folders"][:5]}', file=sys.stderr)
        empty = report['empty_files']
        if empty:
            share = len(empty) / len(ds.reader.samples)
            message = (f'{ds.source}: {len(empty)} of {len(ds.reader.samples)} image files are empty '
                       f'(e.g. {empty[0]})')
            if share > MAX_EMPTY_FILES:
                raise InputError(f'{message}: more than {MAX_EMPTY_FILES:.0%}, so the run stops; remove or '
                                    'replace them')
            if is_main_process():
                print(f'warning: {message}; each is skipped (timm loads the next image in its place)',
                      file=sys.stderr)


def set_transforms(data: DataBundle, model: nn.Module, input_args: Optional[Dict[str, Any]] = None,
                   train_args: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """timm's ``resolve_data_config`` / ``create_transform`` for ``model``: the training transform of
    ``data.train`` (with ``train_args``: scale, ratio, hflip, auto_augment, ...), the evaluation
    transform of ``data.eval`` and ``data.cluster``. ``input_args`` override the model's input
    settings (input_size, img_size, crop_pct, mean, std, interpolation). Returns the data config."""
    data_config = resolve_data_config(dict(input_args or {}), model=model, verbose=False)
    data.train.transform = create_transform(**dict(data_config, **(train_args or {})), is_training=True)
    data.eval.transform = create_transform(**data_config, is_training=False)
    data.cluster.transform = data.eval.transform
    data.data_config = data_config
    return data_config


def split_name(source: str) -> str:
    """The split's name from a ``DataBundle.splits`` entry (a folder, or ``dataset:split``)."""
    return os.path.basename(source.rpartition(':')[2].rstrip(os.sep))


def cluster_batch(dataset: Dataset, batch_size: int, num_batches: int, seed: int) -> torch.Tensor:
    """``num_batches * batch_size`` training images (evaluation transform), chosen by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    n = min(len(dataset), batch_size * max(1, num_batches))
    idx = torch.randperm(len(dataset), generator=g)[:n].tolist()
    return torch.stack([dataset[i][0] for i in idx])
