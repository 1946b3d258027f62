""" Save DropCluster models in timm's Hugging Face Hub format and push them, safetensors only.

A saved folder holds what timm's ``save_for_hf`` writes, ``config.json`` (architecture, model_args
with the DropCluster settings, pretrained_cfg) and ``model.safetensors`` (every parameter and
persistent buffer, so every layer's ``cluster_map`` / ``cluster_counts``), plus a ``README.md``
model card. ``timm.create_model('hf-hub:org/name', pretrained=True)`` or ``'local-dir:/path'``
rebuild the model with the same cluster maps and drop settings (``import dropcluster_timm`` first).

The Hub token is never taken on the command line, printed or written: it comes from the ``token``
argument, the ``HF_TOKEN`` environment variable or the ``hf auth login`` cache, as everywhere in
``huggingface_hub``.
"""
import json
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch.nn as nn
from huggingface_hub import HfApi, get_token
from safetensors import safe_open
from timm.models import save_for_hf

from .model_card import load_metrics, render_model_card
from .models import dropcluster_model_args

__all__ = ['save_pretrained', 'push', 'resolve_push_token', 'UPLOAD_FILES']

# Everything push uploads; pickle-based weight files are never among them.
UPLOAD_FILES = ('config.json', 'model.safetensors', 'README.md', 'metrics.json')
_METRICS_FILES = ('metrics.json', 'summary.csv')


def _architecture(model: nn.Module) -> str:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    if not cfg.get('architecture') or not hasattr(model, 'num_classes'):
        raise ValueError('save_pretrained expects a classification model from timm.create_model '
                         '(not a features_only wrapper)')
    return cfg['architecture']


def save_pretrained(
        model: nn.Module,
        save_directory: Union[str, Path],
        metrics: Optional[Union[Dict[str, Any], str, Path]] = None,
        data_config: Optional[Dict[str, Any]] = None,
        repo_id: Optional[str] = None,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` and a ``README.md`` card for ``model``.

    Args:
        model: a ``*_dropcluster`` model from ``timm.create_model``.
        save_directory: output folder (created).
        metrics: results of the run that trained the weights: a dict, or a metrics file path
            (see ``model_card.load_metrics``); also saved as ``metrics.json``. None: the card says
            no DropCluster-trained weights are published.
        data_config: preprocessing of the weights, as timm's ``save_for_hf`` takes it.
        repo_id: the Hub repo the folder is meant for; the card's usage examples load it.

    Returns:
        the folder.
    """
    arch = _architecture(model)
    model_args = dropcluster_model_args(model)  # current drop rate, which set_drop_prob may have changed
    save_directory = Path(save_directory)
    if isinstance(metrics, (str, Path)):
        metrics = load_metrics(metrics)
    save_for_hf(model, save_directory, model_args=model_args, safe_serialization=True, data_config=data_config)
    config = json.loads((save_directory / 'config.json').read_text())
    if metrics:
        (save_directory / 'metrics.json').write_text(json.dumps(metrics, indent=2))
    readme = render_model_card(arch, metrics=metrics, model_args=config.get('model_args', model_args), repo_id=repo_id)
    (save_directory / 'README.md').write_text(readme, encoding='utf-8')
    return save_directory


def _check_folder(folder: Path) -> Dict[str, Any]:
    """Validate a saved folder; returns its config."""
    if not folder.is_dir():
        raise FileNotFoundError(f'{folder} is not a folder')
    config_path, weights_path = folder / 'config.json', folder / 'model.safetensors'
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f'{folder} must hold config.json and model.safetensors '
                                '(written by dropcluster_timm.hub.save_pretrained); pickle checkpoints are not pushed')
    config = json.loads(config_path.read_text())
    if 'architecture' not in config:
        raise ValueError(f'{config_path} has no "architecture": not a timm Hub config')
    with safe_open(str(weights_path), framework='pt') as f:
        if not any(k.endswith('.cluster_map') for k in f.keys()):
            raise ValueError(f'{weights_path} holds no cluster maps: not a DropCluster checkpoint')
    return config


def resolve_push_token(repo_id: str, token: Optional[str] = None) -> str:
    """Check ``repo_id`` and find the token (argument, ``HF_TOKEN`` or the login cache) before any work.

    Raises ``ValueError`` for a malformed repo id and ``RuntimeError`` without credentials.
    """
    if not isinstance(repo_id, str) or repo_id.count('/') != 1 or not all(repo_id.split('/')):
        raise ValueError(f'repo_id must look like "org/name", got {repo_id!r}')
    token = token or get_token()
    if not token:
        raise RuntimeError('No Hugging Face token: pass token=..., set the HF_TOKEN environment variable '
                           'or run `hf auth login`')
    return token


def push(
        model_or_folder: Union[nn.Module, str, Path],
        repo_id: str,
        token: Optional[str] = None,
        private: bool = False,
        revision: Optional[str] = None,
        commit_message: str = 'Add DropCluster model',
        metrics: Optional[Union[Dict[str, Any], str, Path]] = None,
) -> Any:
    """Upload a DropCluster model to the Hugging Face Hub: config, safetensors weights and card only.

    Args:
        model_or_folder: a model (saved with ``save_pretrained`` first) or a folder written by it.
            A folder without README.md gets a card generated, with results from its
            ``metrics.json`` / ``summary.csv`` if there is one.
        repo_id: ``org/name``; the repo is created if needed.
        token: Hub token; None uses ``HF_TOKEN`` or the ``hf auth login`` cache.
        private: create the repo private.
        revision: branch to push to.
        commit_message: the commit message.
        metrics: results for the card when pushing a model.

    Returns:
        the ``CommitInfo`` of the upload.
    """
    token = resolve_push_token(repo_id, token)

    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(model_or_folder, nn.Module):
            folder = save_pretrained(model_or_folder, Path(tmp) / 'model', metrics=metrics, repo_id=repo_id)
        else:
            folder = Path(model_or_folder)
            config = _check_folder(folder)
            if not (folder / 'README.md').is_file():
                # Card from the folder's own run metrics; upload from a copy, the folder stays as it is.
                found = [folder / n for n in _METRICS_FILES if (folder / n).is_file()]
                staged = Path(tmp) / 'model'
                staged.mkdir()
                for name in UPLOAD_FILES:
                    if (folder / name).is_file():
                        (staged / name).symlink_to((folder / name).resolve())
                card = render_model_card(
                    config['architecture'],
                    metrics=load_metrics(found[0]) if found else None,
                    model_args=config.get('model_args'),
                    repo_id=repo_id,
                )
                (staged / 'README.md').write_text(card, encoding='utf-8')
                folder = staged
        _check_folder(folder)

        api = HfApi(token=token, library_name='dropcluster-timm')
        try:
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=str(folder),
                revision=revision,
                commit_message=commit_message,
                allow_patterns=list(UPLOAD_FILES),
            )
        except Exception as e:  # network, auth and Hub errors alike: one clear message, no token in it
            raise RuntimeError(f'Pushing to the Hugging Face Hub repo {repo_id!r} failed '
                               f'({type(e).__name__}: {e}). Check the network connection and that the token '
                               'may write to this repo.') from None
