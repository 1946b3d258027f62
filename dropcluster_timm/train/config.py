""" Training settings: the ``train`` command line and the typed configuration built from it once.

``add_train_arguments`` defines the command line (timm's flag names where timm has the flag) and
``config_from_args`` is the one adapter from its namespace to a ``TrainConfig``: nothing else in the
package reads the namespace, as in timm, where ``optimizer_kwargs(cfg)`` is the only reader of the
optimizer flags. ``TrainConfig.check`` gives one-line errors for settings that cannot work.
"""
import argparse
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from timm.utils import ParseKwargs

from ..clustering import CLUSTER_METHODS
from ..data import EMBEDDED_DATASET
from ..errors import TrainingError
from ..schedules import SCHEDULE_SHAPES

__all__ = [
    'DataConfig', 'ModelConfig', 'DropClusterConfig', 'OptimConfig', 'OutputConfig', 'TrainConfig',
    'add_train_arguments', 'config_from_args', 'parse_train_args',
]


@dataclass
class DataConfig:
    """The data set, its splits, the input pipeline and the augmentation of the training images."""
    dataset: str = EMBEDDED_DATASET  # '' = ImageFolder, a timm data set name, or the embedded digits
    data_dir: Optional[str] = None
    train_split: str = 'train'
    val_split: str = 'validation'
    num_classes: Optional[int] = None  # checked against the data set
    workers: int = 0
    # timm's resolve_data_config settings (None: the model's own)
    img_size: Optional[int] = None
    input_size: Optional[Tuple[int, int, int]] = None
    crop_pct: Optional[float] = None
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    interpolation: str = ''
    # timm's create_transform settings of the training images
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: Optional[float] = None
    auto_augment: Optional[str] = None
    re_prob: float = 0.0

    def input_args(self) -> Dict[str, Any]:
        """The settings ``timm.data.resolve_data_config`` reads."""
        return {k: getattr(self, k) for k in ('img_size', 'input_size', 'crop_pct', 'mean', 'std', 'interpolation')}

    def train_transform_args(self) -> Dict[str, Any]:
        """The augmentation settings ``timm.data.create_transform`` takes for training."""
        return {k: getattr(self, k) for k in ('scale', 'ratio', 'hflip', 'vflip', 'color_jitter', 'auto_augment',
                                              're_prob')}


@dataclass
class ModelConfig:
    """The model: a timm name (or ``hf-hub:`` / ``local-dir:``) and its arguments."""
    name: str = 'resnet18_dropcluster'
    pretrained: bool = False
    initial_checkpoint: str = ''
    drop_rate: Optional[float] = None
    drop_path_rate: Optional[float] = None
    drop_block_rate: Optional[float] = None
    cluster_method: Optional[str] = None  # DropCluster model arguments (None: the model's default)
    cluster_size: Optional[int] = None
    num_clusters: Optional[int] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DropClusterConfig:
    """The drop-rate ramp and the periodic re-clustering (``DropClusterSchedule``)."""
    rate: float = 0.1
    start_epoch: float = 0.0
    warmup_epochs: float = 0.0
    shape: str = 'linear'
    update_freq: int = 1
    update_batches: int = 2  # batches of training images the clusters are computed from


@dataclass
class OptimConfig:
    """Optimizer, learning-rate schedule, loss, EMA and the seed."""
    epochs: int = 100
    batch_size: int = 128  # per process
    grad_accum_steps: int = 1
    opt: str = 'sgd'
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    clip_grad: Optional[float] = None
    sched: str = 'cosine'
    warmup_epochs: int = 5
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    model_ema: bool = False
    model_ema_decay: float = 0.998
    seed: int = 42


@dataclass
class OutputConfig:
    """The run folder, checkpoints, logging and publishing."""
    output: str = 'output/train'
    resume: Optional[str] = None
    checkpoint_steps: int = 0
    checkpoint_hist: int = 2
    log_with: Optional[str] = None
    push_to_hub: Optional[str] = None
    progress: bool = True


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dropcluster: DropClusterConfig = field(default_factory=DropClusterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready copy, as ``run.json`` records it."""
        return asdict(self)

    def check(self) -> None:
        """One-line errors (``TrainingError``) for settings that cannot work, before any setup."""
        d, m, dc, o, out = self.data, self.model, self.dropcluster, self.optim, self.output

        def fail(flag, value, expected):
            raise TrainingError(f'{flag} must be {expected}, got {value:g}')

        for flag, value in (('--drop-cluster', dc.rate), ('--drop-block', m.drop_block_rate), ('--drop', m.drop_rate),
                            ('--drop-path', m.drop_path_rate), ('--smoothing', o.smoothing), ('--reprob', d.re_prob)):
            if value is not None and not 0.0 <= value < 1.0:
                fail(flag, value, 'in [0, 1)')
        for flag, value in (('--epochs', o.epochs), ('--batch-size', o.batch_size),
                            ('--grad-accum-steps', o.grad_accum_steps),
                            ('--drop-cluster-update-batches', dc.update_batches), ('--cluster-size', m.cluster_size),
                            ('--num-clusters', m.num_clusters), ('--img-size', d.img_size)):
            if value is not None and value < 1:
                fail(flag, value, '>= 1')
        for flag, value in (('--drop-cluster-start', dc.start_epoch), ('--drop-cluster-warmup', dc.warmup_epochs),
                            ('--drop-cluster-update-freq', dc.update_freq), ('--warmup-epochs', o.warmup_epochs),
                            ('--workers', d.workers), ('--checkpoint-steps', out.checkpoint_steps),
                            ('--checkpoint-hist', out.checkpoint_hist), ('--mixup', o.mixup), ('--cutmix', o.cutmix),
                            ('--min-lr', o.min_lr)):
            if value is not None and value < 0:
                fail(flag, value, '>= 0')
        if not o.lr > 0:
            fail('--lr', o.lr, '> 0')
        if o.model_ema and not 0.0 < o.model_ema_decay < 1.0:
            fail('--model-ema-decay', o.model_ema_decay, 'in (0, 1)')


# Defaults that depend on the data: the embedded digits run is small and short. drop_cluster_fractions:
# --drop-cluster-start, --drop-cluster-warmup and --drop-cluster-update-freq as fractions of --epochs, so
# that DropCluster switches on in a run of any length (at 100 epochs: start 20, warmup 10, every 10).
EMBEDDED_DEFAULTS = dict(
    model='resnet18_dropcluster', img_size=32, batch_size=64, epochs=12, opt='adamw', lr=2e-3,
    weight_decay=0.05, warmup_epochs=1, drop_cluster=0.1, hflip=0.0, scale=[0.75, 1.0], workers=0,
    # At 32 px stages 3-4 are 2x2 and 1x1: put DropCluster in the stem (16x16) too, ~16-pixel clusters.
    cluster_size=16, model_kwargs={'dc_stem': True}, drop_cluster_fractions=(0.25, 0.25, 0.25),
)
GENERAL_DEFAULTS = dict(
    model='resnet50_dropcluster', img_size=None, batch_size=128, epochs=100, opt='sgd', lr=0.1,
    weight_decay=1e-4, warmup_epochs=5, drop_cluster=0.1, hflip=0.5, scale=[0.08, 1.0], workers=4,
    model_kwargs={}, drop_cluster_fractions=(0.2, 0.1, 0.1),
)


def add_train_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``train`` command line; options left at None get their data-dependent default in
    ``config_from_args``."""
    g = p.add_argument_group('data (none given: the embedded scikit-learn digits data set)')
    g.add_argument('data_dir_pos', nargs='?', metavar='DATA_DIR', help='same as --data-dir')
    g.add_argument('--data-dir', default=None, help='ImageFolder root (with train/ and validation/ or val/)')
    g.add_argument('--dataset', default='', help='timm dataset name (torch/..., hfds/..., wds/...); '
                   f'"" = ImageFolder, "{EMBEDDED_DATASET}" = embedded')
    g.add_argument('--train-split', default='train')
    g.add_argument('--val-split', default='validation')
    g.add_argument('--num-classes', type=int, default=None, help='checked against the data set')
    g.add_argument('--img-size', type=int, default=None)
    g.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'))
    g.add_argument('--crop-pct', type=float, default=None)
    g.add_argument('--mean', type=float, nargs='+', default=None)
    g.add_argument('--std', type=float, nargs='+', default=None)
    g.add_argument('--interpolation', default='')
    g.add_argument('--workers', '-j', type=int, default=None)
    g = p.add_argument_group('model')
    g.add_argument('--model', default=None)
    g.add_argument('--pretrained', action='store_true')
    g.add_argument('--initial-checkpoint', default='')
    g.add_argument('--drop', type=float, default=None, help='classifier dropout')
    g.add_argument('--drop-path', type=float, default=None)
    g.add_argument('--drop-block', type=float, default=None)
    g.add_argument('--model-kwargs', nargs='*', default=None, action=ParseKwargs, metavar='KEY=VALUE',
                   help='more model arguments, e.g. dc_stem=True dc_stages=[2,3,4]')
    g = p.add_argument_group('DropCluster')
    g.add_argument('--drop-cluster', type=float, default=None, metavar='RATE', help='target drop rate')
    g.add_argument('--drop-cluster-start', type=float, default=None, metavar='EPOCH',
                   help='first epoch with a non-zero rate (default: 20%% of --epochs; 25%% on the digits)')
    g.add_argument('--drop-cluster-warmup', type=float, default=None, metavar='EPOCHS',
                   help='epochs of the ramp to the target rate (default: 10%% of --epochs; 25%% on the digits)')
    g.add_argument('--drop-cluster-shape', default='linear', choices=SCHEDULE_SHAPES)
    g.add_argument('--drop-cluster-update-freq', type=int, default=None, metavar='EPOCHS',
                   help='re-cluster every N epochs from the start epoch on (0: never; default: 10%% of '
                   '--epochs, at least 1; 25%% on the digits)')
    g.add_argument('--drop-cluster-update-batches', type=int, default=2, metavar='N',
                   help='batches of training images the clusters are computed from')
    g.add_argument('--cluster-method', default=None, choices=CLUSTER_METHODS)
    g.add_argument('--cluster-size', type=int, default=None, help='target mean cluster size (elements)')
    g.add_argument('--num-clusters', type=int, default=None, help='clusters per map')
    g = p.add_argument_group('optimisation')
    g.add_argument('--batch-size', '-b', type=int, default=None, help='per process')
    g.add_argument('--grad-accum-steps', type=int, default=1)
    g.add_argument('--epochs', type=int, default=None)
    g.add_argument('--opt', default=None)
    g.add_argument('--lr', type=float, default=None)
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--weight-decay', type=float, default=None)
    g.add_argument('--clip-grad', type=float, default=None)
    g.add_argument('--sched', default='cosine')
    g.add_argument('--warmup-epochs', type=int, default=None)
    g.add_argument('--warmup-lr', type=float, default=1e-5)
    g.add_argument('--min-lr', type=float, default=0.0)
    g.add_argument('--smoothing', type=float, default=0.0)
    g.add_argument('--mixup', type=float, default=0.0)
    g.add_argument('--cutmix', type=float, default=0.0)
    g.add_argument('--model-ema', action='store_true')
    g.add_argument('--model-ema-decay', type=float, default=0.998)
    g.add_argument('--hflip', type=float, default=None)
    g.add_argument('--vflip', type=float, default=0.0)
    g.add_argument('--scale', type=float, nargs=2, default=None)
    g.add_argument('--ratio', type=float, nargs=2, default=[3 / 4, 4 / 3])
    g.add_argument('--color-jitter', type=float, default=None)
    g.add_argument('--aa', default=None, help='auto-augment policy, e.g. rand-m9-mstd0.5')
    g.add_argument('--reprob', type=float, default=0.0)
    g.add_argument('--seed', type=int, default=42)
    g = p.add_argument_group('output')
    g.add_argument('--output', default='output/train', help='run folder: checkpoints/, best/, last/, metrics')
    g.add_argument('--resume', default=None, help='an output folder (its newest checkpoint) or a checkpoint')
    g.add_argument('--checkpoint-steps', type=int, default=0, help='also checkpoint every N batches')
    g.add_argument('--checkpoint-hist', type=int, default=2, help='checkpoints kept')
    g.add_argument('--log-with', default=None, help='accelerate tracker, e.g. tensorboard')
    g.add_argument('--push-to-hub', default=None, metavar='ORG/NAME')
    g.add_argument('--no-progress', action='store_true')
    return p


def _tuple(value: Optional[Sequence]) -> Optional[Tuple]:
    return tuple(value) if value is not None else None


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The typed settings of a parsed ``train`` command line, with the data-dependent defaults filled in."""
    a = argparse.Namespace(**vars(args))  # the caller's namespace stays as it was
    a.data_dir = a.data_dir or getattr(a, 'data_dir_pos', None)
    embedded = not a.data_dir and a.dataset in ('', EMBEDDED_DATASET)
    defaults = dict(EMBEDDED_DEFAULTS if embedded else GENERAL_DEFAULTS)
    start, warmup, update = defaults.pop('drop_cluster_fractions')
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    return TrainConfig(
        data=DataConfig(
            dataset=EMBEDDED_DATASET if embedded else a.dataset, data_dir=a.data_dir, train_split=a.train_split,
            val_split=a.val_split, num_classes=a.num_classes, workers=a.workers, img_size=a.img_size,
            input_size=_tuple(a.input_size), crop_pct=a.crop_pct, mean=_tuple(a.mean), std=_tuple(a.std),
            interpolation=a.interpolation, scale=tuple(a.scale), ratio=tuple(a.ratio), hflip=a.hflip,
            vflip=a.vflip, color_jitter=a.color_jitter, auto_augment=a.aa, re_prob=a.reprob),
        model=ModelConfig(
            name=a.model, pretrained=a.pretrained, initial_checkpoint=a.initial_checkpoint, drop_rate=a.drop,
            drop_path_rate=a.drop_path, drop_block_rate=a.drop_block, cluster_method=a.cluster_method,
            cluster_size=a.cluster_size, num_clusters=a.num_clusters, kwargs=dict(a.model_kwargs or {})),
        dropcluster=DropClusterConfig(
            rate=a.drop_cluster,
            start_epoch=a.drop_cluster_start if a.drop_cluster_start is not None else round(start * a.epochs, 4),
            warmup_epochs=a.drop_cluster_warmup if a.drop_cluster_warmup is not None else round(warmup * a.epochs, 4),
            shape=a.drop_cluster_shape,
            update_freq=(a.drop_cluster_update_freq if a.drop_cluster_update_freq is not None
                         else max(1, round(update * a.epochs))),
            update_batches=a.drop_cluster_update_batches),
        optim=OptimConfig(
            epochs=a.epochs, batch_size=a.batch_size, grad_accum_steps=a.grad_accum_steps, opt=a.opt, lr=a.lr,
            momentum=a.momentum, weight_decay=a.weight_decay, clip_grad=a.clip_grad, sched=a.sched,
            warmup_epochs=a.warmup_epochs, warmup_lr=a.warmup_lr, min_lr=a.min_lr, smoothing=a.smoothing,
            mixup=a.mixup, cutmix=a.cutmix, model_ema=a.model_ema, model_ema_decay=a.model_ema_decay, seed=a.seed),
        output=OutputConfig(
            output=a.output, resume=a.resume, checkpoint_steps=a.checkpoint_steps,
            checkpoint_hist=a.checkpoint_hist, log_with=a.log_with, push_to_hub=a.push_to_hub,
            progress=not a.no_progress),
    )


def parse_train_args(argv: Optional[List[str]] = None, prog: Optional[str] = None,
                     description: Optional[str] = None) -> TrainConfig:
    """Parse a ``train`` command line into a ``TrainConfig``."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return config_from_args(add_train_arguments(parser).parse_args(argv))
