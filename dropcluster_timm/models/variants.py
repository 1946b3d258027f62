""" ``<arch>_dropcluster`` for every timm architecture with DropBlock slots, generated.

Each variant is built by the base architecture's own timm entrypoint with DropBlock slots switched
on, whose ``DropBlock2d`` layers ``convert_drop_blocks`` then replaces by ``DropCluster2d`` layers
(a family may place more, see ``resnet_dropcluster``). Its pretrained tags are those of timm's Hub
weights of the base architecture, read from timm's registry at import (so tags timm adds or removes
follow), and load those weights with grid-initialised cluster maps: a starting point for fine-tuning
with DropCluster, not DropCluster-trained weights.

The architectures come from ``dropblock_architectures.json`` (base names with their DropBlock slot
count, per model family), written by ``python -m dropcluster_timm.models`` from the installed
timm; bases the installed timm does not have are skipped at import.
"""
import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import DropBlock2d
from timm.models import (
    build_model_with_cfg, generate_default_cfgs, get_arch_pretrained_cfgs, model_entrypoint, register_model,
    resolve_pretrained_cfg)

from .convert import convert_drop_blocks
from ..layers.drop_cluster_modules import LAYER_BUFFERS
from ..layers.model_helpers import dropcluster_layers, nonfinite_tensor
from ..layers.options import LAYER_OPTIONS
from ..timm_compat import recorded_model_args, update_model_args

__all__ = ['ModelFamily', 'FAMILIES', 'plain_state_dict', 'describe_placement', 'DROPCLUSTER_ARGS', 'ARCHITECTURES_FILE', 'load_architectures', 'register_family',
           'dropcluster_model_args', 'plain_architecture', 'scan_dropblock_slots', 'input_cfg']

# The registered families, in registration order (python -m dropcluster_timm.models scans them).
FAMILIES: List['ModelFamily'] = []
ARCHITECTURES_FILE = os.path.join(os.path.dirname(__file__), 'dropblock_architectures.json')
# The rate the base is built with so that timm creates its DropBlock slots; the slots become
# DropCluster layers at the requested rate, so this value is never used.
_SLOT_RATE = 0.1
# The DropCluster model arguments and their defaults, recorded in config.json: the rate and one
# dc_<name> per layer option.
DROPCLUSTER_ARGS = dict(drop_cluster_rate=0.0, **{o.model_arg: o.default for o in LAYER_OPTIONS})


@dataclass(frozen=True)
class ModelFamily:
    """How the variants of one timm model class are built.

    Args:
        module: the module the variants register under (``timm.list_models(module=...)``).
        timm_modules: the timm model modules whose architectures belong to the family.
        feature_cfg: the ``feature_cfg`` the family's timm builder passes (``features_only``).
        takes_img_size: whether the model class takes ``img_size``.
        filter_fn: the checkpoint filter of the family's timm builder, if any.
        place: builds the family's extra placements and checks its extra arguments:
            ``place(model, img_size, layer_args, family_args) -> recorded family_args``.
        family_args: the family's extra model arguments with their defaults.
        placement: where the layers sit, for the model card: ``placement(model_args) -> str``.
        plain_state_fn: the inverse of the key moves ``place`` makes, for the base architecture's
            state dict (``export_plain``).
    """
    module: str
    timm_modules: Sequence[str]
    feature_cfg: Dict[str, Any] = field(default_factory=dict)
    takes_img_size: bool = False
    filter_fn: Optional[Callable] = None
    place: Optional[Callable] = None
    family_args: Dict[str, Any] = field(default_factory=dict)
    placement: Callable[[Dict[str, Any]], str] = lambda model_args: _SLOT_PLACEMENT
    plain_state_fn: Optional[Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]] = None


_SLOT_PLACEMENT = "timm's DropBlock slots of the architecture (after the norm of the kxk conv, last two stages)"
_VARIANTS: Dict[str, tuple] = {}  # variant -> (base architecture, family)


def _rate(kwargs: Dict[str, Any]) -> float:
    rate = kwargs.pop('drop_cluster_rate', None)
    rate = 0.0 if rate is None else rate
    if not 0.0 <= float(rate) < 1.0:
        raise ValueError(f'drop_cluster_rate must be in [0, 1), got {rate}')
    return float(rate)


def _layer_args(dc: Dict[str, Any]) -> Dict[str, Any]:
    """``DropCluster2d`` arguments from the ``dc_*`` model arguments (``None``: the slot's own)."""
    args = dict(drop_prob=dc['drop_cluster_rate'], gamma_scale=1.0)
    for option in LAYER_OPTIONS:
        if dc[option.model_arg] is not None:
            args[option.name] = option.value(dc[option.model_arg])
    return args


def _add_cluster_buffers(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """A checkpoint without cluster maps (timm's weights of the base) gets the model's grid maps;
    the model's own checkpoints keep theirs."""
    for name, layer in dropcluster_layers(model):
        prefix = name + '.' if name else ''
        for buffer_name in LAYER_BUFFERS:
            state_dict.setdefault(prefix + buffer_name, getattr(layer, buffer_name).detach().cpu())
    return state_dict


def _slot_rate(variant: str, kwargs: Dict[str, Any]) -> None:
    """timm's ``drop_block_rate`` (``--drop-block`` of its train.py) is the rate of the DropCluster
    layers in the DropBlock slots; ``drop_cluster_rate`` is the explicit name, and the two must agree."""
    block_rate = kwargs.pop('drop_block_rate', None)
    if not block_rate:
        return
    rate = kwargs.get('drop_cluster_rate')
    if rate is not None and float(rate) != float(block_rate):
        raise ValueError(f'{variant}: drop_block_rate {block_rate:g} and drop_cluster_rate {float(rate):g} differ; '
                         'its DropBlock slots hold DropCluster layers, give one rate')
    kwargs['drop_cluster_rate'] = block_rate
    if variant not in _SLOT_RATE_LOGGED:
        _SLOT_RATE_LOGGED.add(variant)
        _logger.info(f'{variant}: drop_block_rate {block_rate:g} is the rate of the DropCluster layers in its '
                     'DropBlock slots')


_SLOT_RATE_LOGGED: set = set()
_logger = logging.getLogger(__name__)


def _create(variant: str, base: str, family: ModelFamily, pretrained: bool = False, **kwargs) -> nn.Module:
    _slot_rate(variant, kwargs)
    dc = {k: kwargs.pop(k, default) for k, default in DROPCLUSTER_ARGS.items() if k != 'drop_cluster_rate'}
    dc['drop_cluster_rate'] = _rate(kwargs)
    family_args = {k: kwargs.pop(k, default) for k, default in family.family_args.items()}
    img_size = kwargs.get('img_size')
    if img_size is None:
        # Grid maps sized for the input size of the weights' config (e.g. 160 for *.a3_in1k).
        cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
        img_size = tuple((cfg.input_size or (3, 224, 224))[-2:])
    img_size = (int(img_size),) * 2 if isinstance(img_size, (int, float)) else tuple(int(s) for s in img_size)
    if len(img_size) != 2 or min(img_size) < 1:
        raise ValueError(f'img_size must be a positive int or (H, W), got {img_size}')

    def build(**model_kwargs) -> nn.Module:
        if not family.takes_img_size:
            model_kwargs.pop('img_size', None)
        model = model_entrypoint(base)(pretrained=False, drop_block_rate=_SLOT_RATE, **model_kwargs)
        convert_drop_blocks(model, img_size=img_size, allow_none=True, **_layer_args(dc))  # placement follows
        recorded = family.place(model, img_size, _layer_args(dc), family_args) if family.place else {}
        if not any(True for _ in dropcluster_layers(model)):
            raise ValueError(f'{variant}: no DropCluster placement (see its model arguments)')
        # Reconstruction arguments: timm writes them to config.json even when left at the defaults.
        update_model_args(model, **dc, **recorded)
        return model

    def filter_fn(state_dict, model):
        state_dict = dict(state_dict)
        bad = nonfinite_tensor(state_dict)
        if bad is not None:  # weights from a file: refused before the model is built on them
            raise ValueError(f'{variant}: the weights hold NaN or inf values in {bad}; refusing to load them')
        if family.filter_fn is not None:
            state_dict = family.filter_fn(state_dict, model)
        return _add_cluster_buffers(state_dict, model)

    return build_model_with_cfg(build, variant, pretrained, feature_cfg=dict(family.feature_cfg),
                                pretrained_filter_fn=filter_fn, **kwargs)


def _variant_cfgs(base: str) -> Dict[str, Dict[str, Any]]:
    """The pretrained cfgs of ``<base>_dropcluster``: one per tag of timm's Hub weights of ``base``
    (default tag first), or one without weights (the base's input settings) if there are none."""
    cfgs = {}
    for name, cfg in get_arch_pretrained_cfgs(base).items():
        if not cfg.hf_hub_id:
            continue  # only Hub weights: the URL-only ones are older copies
        tag = name.partition('.')[2]
        notes = (f'timm {name} weights with grid-initialised DropCluster maps',)
        cfgs[f'{base}_dropcluster.{tag}'] = {k: v for k, v in dataclasses.asdict(
            dataclasses.replace(cfg, architecture=None, tag=None, notes=notes)).items() if v is not None}
    if not cfgs:
        cfgs[f'{base}_dropcluster'] = input_cfg(base)
    return cfgs


def input_cfg(base: str) -> Dict[str, Any]:
    """The input settings (size, crop, normalisation, head names) of ``base``'s pretrained cfg, without
    the identity of its weights: the cfg of a derived architecture that has no weights of its own."""
    source = next(iter(get_arch_pretrained_cfgs(base).values()), None)
    keep = ('input_size', 'fixed_input_size', 'interpolation', 'crop_pct', 'crop_mode', 'mean', 'std',
            'first_conv', 'classifier', 'pool_size', 'num_classes', 'license', 'test_input_size')
    return {k: v for k, v in dataclasses.asdict(source).items() if k in keep and v is not None} if source else {}


def _entrypoint(variant: str, base: str, family: ModelFamily, module: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        return _create(variant, base, family, pretrained, **kwargs)
    entrypoint.__name__ = entrypoint.__qualname__ = variant
    entrypoint.__module__ = module
    entrypoint.__doc__ = f'timm {base} with DropCluster in its DropBlock slots.'
    return entrypoint


def load_architectures() -> Dict[str, Dict[str, int]]:
    """``{family module: {base architecture: DropBlock slot count}}`` from ``ARCHITECTURES_FILE``."""
    with open(ARCHITECTURES_FILE) as f:
        return json.load(f)


def register_family(family: ModelFamily, module_name: str, bases: Sequence[str]) -> List[str]:
    """Register ``<base>_dropcluster`` for every base the installed timm has, into module ``module_name``
    (which gets ``default_cfgs``, as timm's model modules have). Returns the variant names."""
    from timm.models import is_model
    module = sys.modules[module_name]
    bases = [b for b in bases if is_model(b)]
    cfgs = {}
    for base in bases:
        cfgs.update(_variant_cfgs(base))
    module.default_cfgs = generate_default_cfgs(cfgs)
    FAMILIES.append(family)
    names = []
    for base in bases:
        variant = f'{base}_dropcluster'
        _VARIANTS[variant] = (base, family)
        setattr(module, variant, register_model(_entrypoint(variant, base, family, module_name)))
        names.append(variant)
    return names


def dropcluster_model_args(model: nn.Module) -> Dict[str, Any]:
    """The DropCluster model arguments of ``model`` with its current drop rate (as set by
    ``set_drop_prob`` or a schedule), for ``config.json``; empty for a model without DropCluster
    layers, whose recorded arguments timm writes as they are."""
    layers = [layer for _, layer in dropcluster_layers(model)]
    if not layers:
        return {}
    rates = sorted({layer.drop_prob for layer in layers})
    if len(rates) > 1:
        raise ValueError(f'DropCluster layers have different drop rates {rates}; config.json records one '
                         'drop_cluster_rate, set a common rate with dropcluster_timm.set_drop_prob first')
    args = recorded_model_args(model)
    dc_args = {k: v for k, v in args.items() if k.startswith('dc_')}
    dc_args['drop_cluster_rate'] = rates[0]
    return dc_args


def _registered(variant: str) -> tuple:
    """``(base architecture, family)`` of a registered ``*_dropcluster`` variant."""
    if variant not in _VARIANTS:
        raise ValueError(f'{variant!r} is not a registered *_dropcluster architecture')
    return _VARIANTS[variant]


def plain_architecture(variant: str, model_args: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """The base timm architecture of ``variant`` and its model arguments without the DropCluster ones
    (``img_size`` too where the base takes none): what stock timm rebuilds it from."""
    base, family = _registered(variant)
    drop = set(DROPCLUSTER_ARGS) | set(family.family_args)
    if not family.takes_img_size:
        drop.add('img_size')
    return base, {k: v for k, v in model_args.items() if k not in drop}


def plain_state_dict(variant: str, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``variant``'s state dict as its base architecture's: without the cluster buffers, with the keys
    the family moved put back."""
    family = _registered(variant)[1]
    state = {k: v for k, v in state_dict.items() if k.rpartition('.')[2] not in LAYER_BUFFERS}
    return family.plain_state_fn(state) if family.plain_state_fn else state


def describe_placement(variant: str, model_args: Dict[str, Any]) -> str:
    """Where the DropCluster layers of ``variant`` sit, in words (the model card)."""
    return _VARIANTS[variant][1].placement(model_args) if variant in _VARIANTS else _SLOT_PLACEMENT


def scan_dropblock_slots(timm_modules: Sequence[str]) -> Dict[str, int]:
    """``{architecture: DropBlock slot count}`` of the architectures of ``timm_modules`` that have
    slots, each built on the meta device with ``drop_block_rate`` (no memory, about 0.1 s each)."""
    from timm import create_model, list_models
    found = {}
    for module in timm_modules:
        for name in list_models(module=module):
            if name.endswith('_dropcluster'):
                continue
            try:
                with torch.device('meta'):
                    model = create_model(name, drop_block_rate=_SLOT_RATE)
            except TypeError:
                continue  # the model class takes no drop_block_rate
            count = sum(isinstance(m, DropBlock2d) for m in model.modules())
            if count:
                found[name] = count
    return found

