""" The ``train`` command line: timm's ``train.py`` flags (names, meanings, defaults) plus DropCluster's,
generated from the options of ``TrainConfig``, and the one adapter from its namespace to the config.

A timm ``train.py`` command line runs here unchanged: its flags map onto Accelerate where Accelerate
owns the feature (``--amp`` is mixed precision, ``--torchcompile`` the dynamo plugin, ``--no-ddp-bb``
a DDP setting); the few that cannot be supported fail with a one-line reason (``REFUSED``) when they
are set. ``-c config.yaml`` reads defaults from a YAML file of arguments, as timm's does.
"""
import argparse
from typing import Any, Dict, List, Optional

import yaml

from ..errors import InputError
from ..layers.options import LAYER_OPTIONS
from .config import TrainConfig, embedded_config, uses_embedded_data
from .options import TrainOption, describe, iter_options
from .layout import DEFAULT_OUTPUT
from .sections import GROUPS

__all__ = ['ShortErrorParser', 'REFUSED', 'ADAPTER_DESTS', 'add_train_arguments', 'train_dests', 'config_from_args',
           'parse_train_args', 'parse_with_config_file']

# timm flags that cannot be supported here: an error, with why, when set to another value than timm's default.
REFUSED = {  # name: (timm's default, why)
    'fuser': ('', 'TorchScript fusers are not used: the model trains eager or with --torchcompile'),
    'torchscript': (False, 'training a TorchScript model is deprecated in PyTorch; use --torchcompile'),
    'model_dtype': (None, 'low-precision weights are not supported; use --amp (Accelerate mixed precision)'),
    'device_modules': (None, 'import the device modules in your own launcher; Accelerate picks the device'),
    'save_images': (False, "timm's debug image dump is not supported"),
    'tta': (0, 'test-time augmentation is not supported by the evaluation'),
    'aug_splits': (0, "AugMix splits need timm's split BatchNorm, not supported here"),
    'jsd_loss': (False, 'the JSD loss needs --aug-splits, not supported here'),
    'split_bn': (False, 'split BatchNorm (AugMix) is not supported here'),
    'resplit': (False, 'random-erasing resplit needs --aug-splits, not supported here'),
    'worker_seeding': ('all', "only timm's default 'all' worker seeding is supported"),
    'train_img_sizes': (None, 'variable-resolution training is not supported (cluster maps per input size)'),
    'train_batch_sizes': (None, 'variable-resolution training is not supported'),
    'train_size_probs': (None, 'variable-resolution training is not supported'),
    'train_size_schedule': ('constant', 'variable-resolution training is not supported'),
    'variable_batch_loss_scale': ('none', 'variable batch sizes are not supported'),
    'naflex_loader': (False, 'the NaFlex loader (variable patch sequences, ViTs) does not apply to CNN DropCluster models'),
    'kd_model_name': (None, 'knowledge distillation is not supported'),
}


class ShortErrorParser(argparse.ArgumentParser):
    """Argument errors in one line: the usage of some 170 training flags would bury the one that matters."""

    def error(self, message: str):
        self.exit(2, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


def _help(opt: TrainOption, general: TrainConfig, embedded: TrainConfig) -> str:
    """The option's help, with both defaults where the embedded digits run has its own."""
    text = opt.meta['help']
    if opt.path == 'data.dataset':  # the option that picks the digits run; its help says so
        return text
    mine, digits = describe(general.get(opt.path), opt, general), describe(embedded.get(opt.path), opt, embedded)
    if mine != digits:
        text += f' (default {mine}; {digits} on the digits)'
    return text.replace('%', '%%')


def add_train_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``train`` command line: one flag per option of ``TrainConfig`` (``train/sections.py``), the
    DropCluster layer options' flags, and the few flags that only adapt timm's command line. Flags not
    given are absent from the parsed namespace: ``config_from_args`` keeps the config's default."""
    p.add_argument('-c', '--config', default='', metavar='FILE', help='YAML file of argument defaults (as timm)')
    groups = {title: p.add_argument_group(title) for title in GROUPS.values()}
    groups[GROUPS['data']].add_argument('data_dir_pos', nargs='?', metavar='DATA_DIR', default=argparse.SUPPRESS,
                                        help='same as --data-dir')
    general, embedded = TrainConfig(), embedded_config()
    for opt in iter_options(TrainConfig):
        if opt.flag:
            group = groups[opt.meta['group'] or GROUPS[opt.section]]
            group.add_argument(opt.flag, *opt.meta['aliases'], **dict(opt.flag_kwargs(),
                                                                      help=_help(opt, general, embedded)))
    g = groups[GROUPS['model']]
    g.add_argument('--drop-connect', type=float, default=argparse.SUPPRESS, help='(deprecated) --drop-path')
    g.add_argument('--device', default=argparse.SUPPRESS, help="'cpu' forces the CPU; otherwise Accelerate's device")
    g = groups[GROUPS['dropcluster']]
    for option in LAYER_OPTIONS:  # the layer options that have a flag (the others: --model-kwargs dc_<name>=...)
        if option.flag:
            g.add_argument(option.flag, **option.flag_kwargs())
    g = groups[GROUPS['output']]
    g.add_argument('--experiment', default=argparse.SUPPRESS, help='a sub-folder of --output for this run')
    g.add_argument('--log-wandb', action='store_true', default=argparse.SUPPRESS,
                   help='the wandb tracker (--log-with wandb)')
    g.add_argument('--local_rank', type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # torch.distributed.launch's
    for flag in ('--no-prefetcher', '--use-multi-epochs-loader'):  # timm loader options, nothing to do here
        g.add_argument(flag, action='store_true', default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    r = p.add_argument_group('timm flags not supported here (an error when set)')
    for name, (default, _) in REFUSED.items():
        flag = '--' + name.replace('_', '-')
        if isinstance(default, bool):
            r.add_argument(flag, action='store_true', default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        else:
            r.add_argument(flag, default=argparse.SUPPRESS, nargs='*' if default is None else None,
                           help=argparse.SUPPRESS)
    return p


# The command-line names that are not options of the config: how each reaches it.
ADAPTER_DESTS = ('config', 'data_dir_pos', 'drop_connect', 'device', 'experiment', 'log_wandb', 'local_rank',
                 'no_prefetcher', 'use_multi_epochs_loader') + tuple(REFUSED)


def train_dests() -> Dict[str, Optional[TrainOption]]:
    """Every name of the parsed ``train`` command line (and of a ``-c`` file): its option, or None for
    the layer options and the adapters."""
    dests: Dict[str, Optional[TrainOption]] = {opt.dest: opt for opt in iter_options(TrainConfig) if opt.flag}
    dests.update({o.dest: None for o in LAYER_OPTIONS if o.flag})
    dests.update({name: None for name in ADAPTER_DESTS})
    return dests


def _refuse(given: Dict[str, Any]) -> None:
    for name, (default, why) in REFUSED.items():
        value = given.get(name, default)
        if value not in (default, str(default)) and not (default is None and value == []):
            raise InputError(f'--{name.replace("_", "-")} is not supported: {why}')
    device = given.get('device', 'cuda')
    if device not in ('cuda', 'cpu') and not device.startswith('cuda:'):
        raise InputError(f'--device {device}: Accelerate picks the device; use --device cpu or accelerate launch')


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The typed settings of a parsed ``train`` command line: ``embedded_config()`` when it names no
    data, else ``TrainConfig()``, with the flags given set on it."""
    given = dict(vars(args))
    _refuse(given)
    data_dir = given.get('data_dir') or given.get('data_dir_pos')
    given['data_dir'] = data_dir
    embedded = uses_embedded_data(given.get('dataset', ''), data_dir)
    if embedded:
        cfg = embedded_config(given.get('model'))
        given.pop('dataset', None)
    else:
        cfg = TrainConfig()
    for dest, opt in train_dests().items():
        if opt is not None and dest in given:
            cfg.set(opt.path, opt.from_flag(given[dest]))
    for option in LAYER_OPTIONS:
        if option.flag and given.get(option.dest) is not None:
            cfg.model.layer_options[option.name] = option.value(given[option.dest])
    if given.get('drop_connect') is not None and 'drop_path' not in given:
        cfg.model.drop_path_rate = given['drop_connect']
    if given.get('experiment'):
        cfg.output.output = f'{(cfg.output.output or DEFAULT_OUTPUT).rstrip("/")}/{given["experiment"]}'
    if given.get('log_wandb'):
        cfg.output.log_with = 'wandb'
    cfg.output.cpu = given.get('device') == 'cpu'
    return cfg


def _read_config_file(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f'-c {path}: cannot read it ({type(e).__name__}: {e})') from e
    if not isinstance(values, dict):
        raise InputError(f'-c {path}: expected a mapping of argument names to values')
    known = train_dests()
    unknown = sorted(k for k in values if k.replace('-', '_') not in known)
    if unknown:
        raise InputError(f'-c {path}: unknown arguments {", ".join(unknown)}')
    return {k.replace('-', '_'): v for k, v in values.items()}


def parse_train_args(argv: Optional[List[str]] = None, prog: Optional[str] = None,
                     description: Optional[str] = None) -> TrainConfig:
    """Parse a ``train`` command line (with ``-c config.yaml`` defaults) into a ``TrainConfig``."""
    parser = add_train_arguments(ShortErrorParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter))
    return config_from_args(parse_with_config_file(parser, argv))


def parse_with_config_file(parser: argparse.ArgumentParser, argv: Optional[List[str]] = None) -> argparse.Namespace:
    """``parser.parse_args`` with the defaults of a ``-c`` / ``--config`` YAML file, as timm's train.py."""
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**_read_config_file(first.config))
    return parser.parse_args(argv)
