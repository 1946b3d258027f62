""" Save timm models (DropCluster or plain) in timm's Hugging Face Hub format, safetensors only.

A saved folder holds what timm's ``save_for_hf`` writes, ``config.json`` (architecture, model_args
with the DropCluster settings, pretrained_cfg) and ``model.safetensors`` (every parameter and
persistent buffer, so every layer's ``cluster_map`` / ``cluster_counts``), plus a ``README.md``
model card; for trained weights also the run's ``metrics.json``, and for a model with 2-D cluster
maps a picture of them, ``cluster_maps.png``. ``timm.create_model('hf-hub:org/name', pretrained=True)``
or ``'local-dir:/path'`` rebuild the model with the same cluster maps and drop settings
(``import dropcluster_timm`` first).
"""
import contextlib
import ctypes
import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import timm
import torch.nn as nn
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import safe_open
from timm.models import get_model_args, save_for_hf

from .model_card import CLUSTER_MAPS_IMAGE, is_dropcluster_architecture, render_model_card, training_notes
from .run_results import RunResults, load_metrics
from ..models import dropcluster_model_args
from ..destination import check_destination
from ..files import fsync_path
from ..errors import one_line, first_line
from ..models.variants import plain_architecture, plain_state_dict
from .pictures import plot_cluster_maps

__all__ = ['save_pretrained', 'copy_model_folder', 'export_plain', 'UPLOAD_FILES', 'check_model_folder', 'check_repo_id',
           'folder_card']

# Everything push uploads; pickle-based weight files are never among them.
UPLOAD_FILES = ('config.json', 'model.safetensors', 'README.md', 'metrics.json', CLUSTER_MAPS_IMAGE)
_METRICS_FILES = ('metrics.json', 'summary.csv')
# pretrained_cfg fields that name the weights a model was created with (timm's ImageNet tags): wrong
# for weights trained by a run. The preprocessing fields stay.
_SOURCE_IDENTITY_KEYS = ('tag', 'notes', 'paper_ids', 'paper_name', 'origin_url', 'description', 'license')


def _architecture(model: nn.Module) -> str:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    if not cfg.get('architecture') or not hasattr(model, 'num_classes'):
        raise ValueError('save_pretrained expects a classification model from timm.create_model '
                         '(not a features_only wrapper)')
    return cfg['architecture']


def save_pretrained(
        model: nn.Module,
        save_directory: Union[str, Path],
        metrics: Optional[Union[RunResults, Dict[str, Any], str, Path]] = None,
        data_config: Optional[Dict[str, Any]] = None,
        repo_id: Optional[str] = None,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` and a ``README.md`` card for ``model`` (plus
    ``metrics.json`` for trained weights and ``cluster_maps.png`` for 2-D cluster maps).

    Args:
        model: a classification model from ``timm.create_model``: a ``*_dropcluster`` model or any
            other timm architecture.
        save_directory: output folder (created).
        metrics: results of the run that trained the weights: a ``RunResults`` (or a dict of its
            fields), or a metrics file path (``load_metrics``); saved as ``metrics.json``, and config.json's
            pretrained_cfg then describes these weights instead of the ones the model was created
            with. None: the card of the architecture (no DropCluster-trained weights published).
        data_config: preprocessing of the weights, as timm's ``save_for_hf`` takes it.
        repo_id: the Hub repo the folder is meant for; the card's usage examples load it. Without
            it, ``push`` writes the repo into the card when it uploads.

    Returns:
        the folder.
    """
    arch = _architecture(model)  # a classifier from timm.create_model, not a features_only wrapper
    if isinstance(metrics, (str, Path)):
        results = load_metrics(metrics)
    else:
        results = RunResults.from_dict(metrics) if metrics else None  # checked before anything is written
    if repo_id is not None:
        check_repo_id(repo_id)
    # the current drop rate, which set_drop_prob may have changed; timm records the other arguments
    model_args = dropcluster_model_args(model)
    weights_cfg = _weights_cfg(model, results) if results else model.pretrained_cfg
    save_directory = Path(save_directory)
    _check_replaceable(save_directory)
    save_directory.parent.mkdir(parents=True, exist_ok=True)
    # The whole folder is staged beside the target, synced, then swapped in at once: a reader (or a
    # crash) meets the old folder or the new one, never a mix of new weights and an old config.
    staging = Path(tempfile.mkdtemp(dir=save_directory.parent, prefix=f'.{save_directory.name}.new.'))
    try:
        # The training data's class names (the trainer records them) go into config.json's label_names.
        labels = weights_cfg.get('label_names')
        model_config = {'label_names': list(labels)} if labels and len(labels) == model.num_classes else None
        # safetensors refuses channels-last (strided) tensors
        with _contiguous_tensors(model), _pretrained_cfg(model, weights_cfg):
            save_for_hf(model, staging, model_config=model_config, model_args=model_args, safe_serialization=True,
                        data_config=data_config)
        if results:
            (staging / 'metrics.json').write_text(json.dumps(results.to_dict(), indent=2))
        picture = plot_cluster_maps(model, str(staging / CLUSTER_MAPS_IMAGE))  # None without 2-D cluster maps
        card = render_model_card(arch, metrics=results, model_args=get_model_args(model, model_args), repo_id=repo_id,
                                 cluster_maps=CLUSTER_MAPS_IMAGE if picture else None, **_card_license(weights_cfg, results))
        (staging / 'README.md').write_text(card, encoding='utf-8')
        # Every file gets the mode the umask gives config.json (safetensors writes 0600), and the folder
        # the same with search bits (mkdtemp's 0700 is for staging only).
        mode = (staging / 'config.json').stat().st_mode & 0o666
        for path in staging.iterdir():
            path.chmod(mode)
        staging.chmod(mode | (mode & 0o444) >> 2)
        _keep_other_files(save_directory, staging)
        _replace_folder(staging, save_directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a swap
    return save_directory


def copy_model_folder(source: Union[str, Path], save_directory: Union[str, Path]) -> Path:
    """Put a copy of the model folder ``source`` (written by ``save_pretrained``) at ``save_directory``,
    swapped in at once like a save: the trainer's ``best/`` is its ``last/`` of that epoch, written once.
    The files are hard links where the file system allows (a save never changes a file in place)."""
    source, save_directory = Path(source), Path(save_directory)
    _check_replaceable(save_directory)
    staging = Path(tempfile.mkdtemp(dir=save_directory.parent, prefix=f'.{save_directory.name}.new.'))
    try:
        for name in _FOLDER_FILES:
            if (source / name).is_file():
                _link_or_copy(source / name, staging / name)
        staging.chmod(source.stat().st_mode & 0o777)
        _keep_other_files(save_directory, staging)
        _replace_folder(staging, save_directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return save_directory


def _weights_cfg(model: nn.Module, results: RunResults) -> Dict[str, Any]:
    """The pretrained_cfg of weights trained by a run: without the identity of the weights the model
    was created with (tag, notes, papers, origin, and the license unless the run fine-tuned them:
    ``base_model``), with their preprocessing, and a note of how the weights were trained."""
    arch = model.pretrained_cfg['architecture']
    cfg = {k: v for k, v in model.pretrained_cfg.items()
           if k not in _SOURCE_IDENTITY_KEYS or (k == 'license' and results.base_model)}
    dropcluster = is_dropcluster_architecture(arch, dropcluster_model_args(model))
    cfg['notes'] = [training_notes(arch, results, dropcluster)]
    return cfg


def _card_license(pretrained_cfg: Dict[str, Any], results: Optional[RunResults]) -> Dict[str, str]:
    """A fine-tune is under the terms of the weights it started from; anything else under the code's."""
    license = pretrained_cfg.get('license')
    return {'license': license} if results and results.base_model and license else {}


@contextlib.contextmanager
def _pretrained_cfg(model: nn.Module, cfg: Dict[str, Any]):
    """``model.pretrained_cfg`` is ``cfg`` for the block (timm's ``save_for_hf`` reads it), its own afterwards."""
    own = model.pretrained_cfg
    model.pretrained_cfg = cfg
    try:
        yield model
    finally:
        model.pretrained_cfg = own


_FOLDER_FILES = ('model.safetensors', 'config.json', 'metrics.json', CLUSTER_MAPS_IMAGE, 'README.md')


def _check_replaceable(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise ValueError(f'{folder} is a file, not a model folder')


def _keep_other_files(target: Path, staging: Path) -> None:
    """Carry what else the old folder holds (a user's notes, say) into the new one, as hard links
    (copies across file systems): a save replaces only the files it writes."""
    if not target.is_dir():
        return
    for path in target.iterdir():
        if path.name in _FOLDER_FILES or (staging / path.name).exists():
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.copytree(path, staging / path.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(path, staging / path.name)


def _link_or_copy(src, dst) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _replace_folder(staging: Path, target: Path) -> None:
    """Put the complete folder ``staging`` at ``target``: its files and itself synced first, then
    swapped with the old folder in one step (or renamed into place when there is none)."""
    for path in staging.iterdir():
        if path.name in _FOLDER_FILES:
            fsync_path(path)
    fsync_path(staging)
    if target.is_dir() and _exchange(staging, target):
        shutil.rmtree(staging)  # now the old folder
    else:
        if target.is_dir():  # no atomic exchange here: move the old folder aside, then rename
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f'.{target.name}.old.'))
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old)
        else:
            os.replace(staging, target)
    fsync_path(target.parent)


@contextlib.contextmanager
def _contiguous_tensors(model: nn.Module):
    """Give ``model``'s non-contiguous parameters and buffers contiguous storage for the block, and
    their own (e.g. channels-last) storage back afterwards: the Parameter objects, and so an
    optimizer's references to them, stay the same."""
    swapped = []
    for t in itertools.chain(model.parameters(), model.buffers()):
        if not t.is_contiguous():
            swapped.append((t, t.data))
            t.data = t.data.contiguous()
    try:
        yield model
    finally:
        for t, data in swapped:
            t.data = data


def export_plain(
        model_or_folder: Union[nn.Module, str, Path],
        save_directory: Union[str, Path],
        repo_id: Optional[str] = None,
        overwrite: bool = False,
) -> Path:
    """Write a ``*_dropcluster`` model as its base timm architecture: the same weights without the
    DropCluster layers and cluster buffers, a folder that stock timm loads without this package
    (``timm.create_model('local-dir:...')`` / ``hf-hub:``) and that gives the same eval-mode outputs
    (DropCluster is the identity at inference).

    Args:
        model_or_folder: a ``*_dropcluster`` model, or a folder written by ``save_pretrained`` (its
            ``metrics.json`` goes along).
        save_directory: output folder.
        repo_id: the Hub repo the folder is meant for (the card's usage examples).
        overwrite: replace ``save_directory`` when it exists and is not empty (else ``ValueError``,
            before any work). Never the folder read, nor a folder around it.

    Returns:
        the folder.
    """
    metrics = None
    if isinstance(model_or_folder, nn.Module):
        model = model_or_folder
        check_destination(str(save_directory), 'the export folder', folder=True, overwrite=overwrite)
    else:
        folder = Path(model_or_folder)
        check_model_folder(folder)
        check_destination(str(save_directory), 'the export folder', folder=True, overwrite=overwrite,
                          reads=[str(folder)])
        try:
            model = timm.create_model(f'local-dir:{folder}', pretrained=True)
        except RuntimeError as e:  # weights that do not load (torch's state-dict error): bad input
            raise ValueError(one_line(e)) from e
        if (folder / 'metrics.json').is_file():
            metrics = load_metrics(folder / 'metrics.json')
    arch = _architecture(model)
    base, args = plain_architecture(arch, get_model_args(model))
    plain = timm.create_model(base, pretrained=False, **args)
    plain.load_state_dict(plain_state_dict(arch, model.state_dict()))  # strict: the base has exactly these parameters and buffers
    plain.pretrained_cfg = dict(model.pretrained_cfg, architecture=base)  # preprocessing of these weights
    return save_pretrained(plain, save_directory, metrics=metrics, repo_id=repo_id)


def folder_card(folder: Path, repo_id: Optional[str]) -> str:
    """The card of a saved folder, from what it holds (config.json, the run's metrics file,
    cluster_maps.png): push renders it for the repo it uploads to."""
    config = json.loads((folder / 'config.json').read_text())
    found = [folder / n for n in _METRICS_FILES if (folder / n).is_file()]
    metrics = load_metrics(found[0]) if found else None
    return render_model_card(
        config['architecture'],
        metrics=metrics,
        model_args=config.get('model_args'),
        repo_id=repo_id,
        cluster_maps=CLUSTER_MAPS_IMAGE if (folder / CLUSTER_MAPS_IMAGE).is_file() else None,
        **_card_license(config.get('pretrained_cfg') or {}, metrics),
    )


def check_model_folder(folder: Path) -> Dict[str, Any]:
    """Validate a saved folder; returns its config."""
    if not folder.is_dir():
        raise FileNotFoundError(f'{folder}: no such folder (expected one written by dropcluster_timm.hub.save_pretrained)')
    config_path, weights_path = folder / 'config.json', folder / 'model.safetensors'
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f'{folder} must hold config.json and model.safetensors '
                                '(written by dropcluster_timm.hub.save_pretrained); pickle checkpoints are not pushed')
    try:
        config = json.loads(config_path.read_text())
    except ValueError as e:
        raise ValueError(f'{config_path} is not valid JSON: {e}') from None
    if not isinstance(config, dict) or 'architecture' not in config:
        raise ValueError(f'{config_path} has no "architecture": not a timm Hub config')
    try:
        with safe_open(str(weights_path), framework='pt') as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise ValueError(f'{weights_path} is not a readable safetensors file ({e})') from None
    # only DropCluster models carry cluster maps; weights of a plain timm model are pushed as they are
    if is_dropcluster_architecture(config['architecture'], config.get('model_args')) \
            and not any(k.endswith('.cluster_map') for k in keys):
        raise ValueError(f'{weights_path} holds no cluster maps, but {config["architecture"]} is a DropCluster '
                         'model: not a DropCluster checkpoint')
    return config


def check_repo_id(repo_id: str) -> None:
    """Raise ``ValueError`` unless ``repo_id`` is a valid ``org/name`` (huggingface_hub's own rules;
    push needs the owner spelled out)."""
    if not isinstance(repo_id, str) or repo_id.count('/') != 1 or not all(repo_id.split('/')):
        raise ValueError(f'repo_id must look like "org/name", got {repo_id!r}')
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f'repo_id {repo_id!r} is not a valid Hub repo id: {first_line(e)}') from None
