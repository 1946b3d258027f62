""" The DropCluster layer options, each declared once.

Every entry is read where the option appears: the ``DropCluster1d/2d/3d`` argument defaults, the
``dc_<name>`` arguments of the ``*_dropcluster`` models (recorded in ``config.json``), the ``train``
flags with their help, the training config and the model card. Its check (``minimum``, ``choices``)
is declared with it and run by the layer's constructor and the training config alike
(``layer_options_error``).
"""
import argparse
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from ..clustering.cluster_count import CLUSTER_COUNTS
from ..clustering.engine import CLUSTER_METHODS
from .drop_cluster import DROP_MODES

__all__ = ['LayerOption', 'LAYER_OPTIONS', 'layer_option', 'option_defaults', 'layer_options_error']


_SAME = object()  # layer_default: as the models' default


@dataclass(frozen=True)
class LayerOption:
    """One option of the DropCluster layers.

    Args:
        name: the layer argument; the model argument is ``dc_<name>``.
        default: the default of the layer and of the model argument (``None``: derived, as ``help`` says).
        help: what it does, for the flag's help and the docs.
        type: ``int``, ``bool`` or ``str``.
        flag: the ``train`` flag; ``None``: set it with ``--model-kwargs dc_<name>=...``.
        choices: the allowed values of a ``str`` option.
        card: the model card's phrase for a value other than the default (``{value}`` is filled in).
        layer_default: the default of a layer built alone, where it differs from the models' ``default``.
        minimum: the smallest value of an ``int`` option.
    """
    name: str
    default: Any
    help: str
    type: type = str
    flag: Optional[str] = None
    choices: Optional[Tuple[str, ...]] = None
    card: Optional[str] = None
    layer_default: Any = _SAME
    minimum: Optional[int] = None

    def error(self, value: Any, label: str) -> Optional[str]:
        """Why ``value`` does not fit this option (``label`` names it: a flag or an argument), or None."""
        if value is None:
            return None
        if self.minimum is not None and value < self.minimum:
            return f'{label} must be >= {self.minimum}, got {value:g}'
        if self.choices and value not in self.choices:
            return f'{label} must be one of {", ".join(self.choices)}, got {value!r}'
        return None

    @property
    def alone_default(self) -> Any:
        """The default of a ``DropCluster1d/2d/3d`` built alone."""
        return self.default if self.layer_default is _SAME else self.layer_default

    @property
    def model_arg(self) -> str:
        return f'dc_{self.name}'

    @property
    def dest(self) -> str:
        """The attribute of the parsed ``train`` command line."""
        return self.flag[2:].replace('-', '_')

    def flag_kwargs(self) -> Dict[str, Any]:
        """``add_argument`` keywords: a flag not given is left out of the parsed namespace, so the
        model's default applies."""
        default = '' if self.default is None else f' (default: {self.default})'
        if self.type is bool:
            return dict(action='store_true', default=argparse.SUPPRESS, help=self.help)
        return dict(type=self.type, default=argparse.SUPPRESS, choices=self.choices, help=self.help + default)

    def value(self, value: Any) -> Any:
        """``value`` as this option's type (a model argument read from JSON or the command line)."""
        return None if value is None else self.type(value)


LAYER_OPTIONS: Tuple[LayerOption, ...] = (
    # the model's default is the slot's own DropBlock block size; a layer built alone defaults to 7
    LayerOption('block_size', None, "side of the first grid map's square blocks, and the default cluster size "
                "block_size ** dims (default: the slot's DropBlock block size)", type=int, minimum=1),
    LayerOption('cluster_size', None, 'target mean cluster size in elements (default: block_size ** dims)',
                type=int, minimum=1, flag='--cluster-size'),
    LayerOption('num_clusters', None, 'clusters per map (instead of a mean cluster size)', type=int, minimum=1,
                flag='--num-clusters'),
    LayerOption('cluster_method', 'rena', 'clustering method', flag='--cluster-method', choices=CLUSTER_METHODS,
                card='method {value}'),
    LayerOption('cluster_count', 'fixed', "'gap': each map's cluster count chosen by a gap statistic",
                flag='--cluster-count', choices=CLUSTER_COUNTS, card='a count per map by gap statistic'),
    LayerOption('min_cluster_size', None, "lower bound of --cluster-count gap, in elements (default: a quarter "
                'of the fixed mean size)', type=int, minimum=1, flag='--min-cluster-size'),
    LayerOption('max_cluster_size', None, 'upper bound of --cluster-count gap, in elements (default: 4x the '
                'fixed mean size)', type=int, minimum=1, flag='--max-cluster-size'),
    LayerOption('skip_unstructured', False, 'leave maps without spatial structure (Hopkins-type test) undropped',
                type=bool, flag='--skip-unstructured', card='maps without spatial structure left undropped'),
    LayerOption('drop_mode', 'uniform', "'size': DropBlock-style size-dependent cluster rates, the same expected "
                'dropped fraction', flag='--cluster-drop-mode', choices=DROP_MODES, card='size-dependent cluster rates'),
    LayerOption('batch_shared', False, 'one drop mask for the whole batch', type=bool, flag='--batch-shared-mask',
                card='one mask per batch'),
    LayerOption('couple_channels', False, 'one cluster map and one drop decision for all channels', type=bool,
                card='one map for all channels'),
    LayerOption('with_noise', False, 'fill dropped elements with Gaussian noise instead of zeros', type=bool),
    # The layers' own schedule, for training loops that know nothing of DropCluster (timm's train.py, a
    # plain loop): on in the *_dropcluster models, off in a layer built alone (as timm's DropBlock2d);
    # `dropcluster-timm train` turns it off and drives the layers itself.
    LayerOption('recluster_every', 1000, 're-cluster from the input the layer sees at its first training forward '
                '(unless its maps come from data) and every N training forwards after (0: never; the maps '
                'change only by update_clusters)', type=int, minimum=0, layer_default=0),
    LayerOption('ramp_steps', 2000, 'raise the drop rate linearly from 0 to drop_prob over the first N training '
                'forwards (0: the full rate from the start)', type=int, minimum=0, layer_default=0),
    LayerOption('cluster_images', 32, 'images of a training batch a layer clusters from', type=int, minimum=1),
)


def layer_option(name: str) -> LayerOption:
    """The option called ``name``."""
    for option in LAYER_OPTIONS:
        if option.name == name:
            return option
    raise KeyError(f'no DropCluster layer option {name!r}; the options: {[o.name for o in LAYER_OPTIONS]}')


def option_defaults(alone: bool = False) -> Dict[str, Any]:
    """``{layer argument: default}`` of the options: the models' defaults, or with ``alone`` those of a
    layer built alone."""
    return {o.name: o.alone_default if alone else o.default for o in LAYER_OPTIONS}


def layer_options_error(values: Dict[str, Any], label: Callable[[LayerOption], str]) -> Optional[str]:
    """Why the option values ``values`` (``{name: value}``, None for unset) cannot make a layer, or None:
    each option's own check, then those between options. ``label(option)`` names an option in the
    message (the layer argument, the model argument or the ``train`` flag)."""
    for option in LAYER_OPTIONS:
        error = option.error(values.get(option.name), label(option))
        if error:
            return error
    low, high = values.get('min_cluster_size'), values.get('max_cluster_size')
    if low is not None and high is not None and low > high:
        return (f'{label(layer_option("min_cluster_size"))} {low} exceeds '
                f'{label(layer_option("max_cluster_size"))} {high}')
    if values.get('cluster_count') == 'gap' and values.get('cluster_method') == 'grid':
        return f"{label(layer_option('cluster_count'))} gap needs a data-driven {label(layer_option('cluster_method'))}, not grid"
    return None
