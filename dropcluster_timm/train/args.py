""" The ``train`` command line: timm's ``train.py`` flags (names, meanings, defaults) plus DropCluster's,
and the one adapter from its namespace to a typed ``TrainConfig``.

A timm ``train.py`` command line runs here unchanged: its flags map onto Accelerate where Accelerate
owns the feature (``--amp`` is mixed precision, ``--torchcompile`` the dynamo plugin, ``--no-ddp-bb``
a DDP setting); the few that cannot be supported fail with a one-line reason (``REFUSED``) when they
are set. ``-c config.yaml`` reads defaults from a YAML file of arguments, as timm's does.
"""
import argparse
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml
from timm.utils import ParseKwargs

from ..data import EMBEDDED_DATASET
from ..errors import TrainingError
from ..layers.options import LAYER_OPTIONS
from ..layers.schedules import SCHEDULE_SHAPES
from .config import DataConfig, DropClusterConfig, EDropoutConfig, LossConfig, ModelConfig, OptimConfig, OutputConfig, TrainConfig

__all__ = ['ShortErrorParser', 'REFUSED', 'EMBEDDED_DEFAULTS', 'GENERAL_DEFAULTS', 'add_train_arguments', 'config_from_args',
           'parse_train_args']

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

# Defaults that depend on the data. The embedded digits run is small and short; the general ones are
# timm's. drop_cluster_fractions: --drop-cluster-start, --drop-cluster-warmup and
# --drop-cluster-update-freq as fractions of --epochs, so that DropCluster switches on in a run of any
# length (at 100 epochs: start 20, warmup 10, re-cluster every 10).
EMBEDDED_DEFAULTS = dict(
    model='resnet18_dropcluster', img_size=32, batch_size=64, epochs=12, opt='adamw', lr=2e-3,
    weight_decay=0.05, warmup_epochs=1, drop_cluster=0.1, hflip=0.0, scale=[0.75, 1.0], workers=0,
    smoothing=0.0, color_jitter=None, train_interpolation='', checkpoint_hist=2, sched_on_updates=True,
    # At 32 px stages 3-4 are 2x2 and 1x1: put DropCluster in the stem (16x16) too, ~16-pixel clusters.
    cluster_size=16, model_kwargs={'dc_stem': True}, drop_cluster_fractions=(0.25, 0.25, 0.25),
)
# The defaults above that are arguments of a *_dropcluster model, not applied to other models.
_DROPCLUSTER_MODEL_DEFAULTS = ('cluster_size', 'model_kwargs')
GENERAL_DEFAULTS = dict(
    model='resnet50_dropcluster', img_size=None, batch_size=128, epochs=300, opt='sgd', lr=None,
    weight_decay=2e-5, warmup_epochs=5, drop_cluster=0.1, hflip=0.5, scale=[0.08, 1.0], workers=4,
    smoothing=0.1, color_jitter=0.4, train_interpolation='random', checkpoint_hist=10, sched_on_updates=False,
    model_kwargs={}, drop_cluster_fractions=(0.2, 0.1, 0.1),
)


class ShortErrorParser(argparse.ArgumentParser):
    """Argument errors in one line: the usage of some 170 training flags would bury the one that matters."""

    def error(self, message: str):
        self.exit(2, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


def add_train_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``train`` command line; options left at None get their data-dependent default in
    ``config_from_args``."""
    p.add_argument('-c', '--config', default='', metavar='FILE', help='YAML file of argument defaults (as timm)')
    g = p.add_argument_group('data (none given: the embedded scikit-learn digits data set)')
    g.add_argument('data_dir_pos', nargs='?', metavar='DATA_DIR', help='same as --data-dir')
    g.add_argument('--data-dir', default=None, help='ImageFolder root (with train/ and validation/ or val/)')
    g.add_argument('--dataset', default='', help='timm dataset name (torch/..., hfds/..., wds/...); '
                   f'"" = ImageFolder, "{EMBEDDED_DATASET}" = embedded')
    g.add_argument('--train-split', default='train', help='training split folder or name (else "training")')
    g.add_argument('--val-split', default='validation',
                   help='validation split (else val, valid, eval, evaluation or test)')
    g.add_argument('--train-num-samples', type=int, default=None,
                   help='training samples of an iterable data set (timm)')
    g.add_argument('--val-num-samples', type=int, default=None,
                   help='validation samples of an iterable data set (timm)')
    g.add_argument('--dataset-download', action='store_true', help='let a torchvision data set download itself')
    g.add_argument('--class-map', default='', help='file mapping folder names to class indices (timm)')
    g.add_argument('--input-img-mode', default=None, help='image mode the data set converts to, e.g. RGB (timm)')
    g.add_argument('--input-key', default=None, help='image field of a Hugging Face or WebDataset data set')
    g.add_argument('--target-key', default=None, help='label field of a Hugging Face or WebDataset data set')
    g.add_argument('--dataset-trust-remote-code', action='store_true', help='run a Hub data set\'s own loading code')
    g.add_argument('--num-classes', type=int, default=None, help='checked against the data set')
    g.add_argument('--img-size', type=int, default=None,
                   help='input size in pixels (default: the model\'s; 32 on the digits)')
    g.add_argument('--in-chans', type=int, default=None, help='input channels')
    g.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'),
                   help='input size as channels height width')
    g.add_argument('--crop-pct', type=float, default=None, help='evaluation centre-crop fraction')
    g.add_argument('--mean', type=float, nargs='+', default=None, help='normalisation mean per channel')
    g.add_argument('--std', type=float, nargs='+', default=None, help='normalisation standard deviation per channel')
    g.add_argument('--interpolation', default='', help='resize interpolation for evaluation (default: the model\'s)')
    g.add_argument('--workers', '-j', type=int, default=None,
                   help='data-loading processes per training process (default 4; 0 on the digits)')
    g.add_argument('--pin-mem', action='store_true', help='pinned host memory (always on for a GPU)')
    g = p.add_argument_group('model')
    g.add_argument('--model', default=None,
                   help='timm model name (default resnet50_dropcluster; resnet18_dropcluster on the digits)')
    g.add_argument('--pretrained', action='store_true', help='start from timm\'s pretrained weights of the model')
    g.add_argument('--pretrained-path', default=None,
                   help='a local weights file to use as the model\'s pretrained weights with --pretrained')
    g.add_argument('--initial-checkpoint', default='',
                   help='a weights file loaded into the model before training (timm\'s load_checkpoint)')
    g.add_argument('--gp', default=None, help='global pool type')
    g.add_argument('--drop', type=float, default=None, help='classifier dropout')
    g.add_argument('--drop-connect', type=float, default=None, help='(deprecated) --drop-path')
    g.add_argument('--drop-path', type=float, default=None, help='stochastic depth rate')
    g.add_argument('--drop-block', type=float, default=None, help='DropBlock rate, ramped like --drop-cluster')
    g.add_argument('--bn-momentum', type=float, default=None, help='BatchNorm momentum')
    g.add_argument('--bn-eps', type=float, default=None, help='BatchNorm epsilon')
    g.add_argument('--model-kwargs', nargs='*', default=None, action=ParseKwargs, metavar='KEY=VALUE',
                   help='more model arguments, e.g. dc_stem=True dc_stages=[2,3,4]')
    g.add_argument('--head-init-scale', type=float, default=None, help='scale of the classifier\'s initial weights')
    g.add_argument('--head-init-bias', type=float, default=None, help='initial bias of the classifier')
    g.add_argument('--grad-checkpointing', action='store_true',
                   help='recompute activations in the backward to save memory')
    g.add_argument('--channels-last', action='store_true', help='channels-last memory format')
    g.add_argument('--fast-norm', action='store_true', help='timm\'s fast normalisation layers (lower precision)')
    g.add_argument('--sync-bn', action='store_true', help='synchronise BatchNorm statistics across processes')
    g.add_argument('--torchcompile', nargs='?', const='inductor', default=None, metavar='BACKEND',
                   help='torch.compile the model with this backend (default inductor)')
    g.add_argument('--torchcompile-mode', default=None, help='torch.compile mode, e.g. max-autotune')
    g.add_argument('--amp', action='store_true', help='mixed precision (Accelerate)')
    g.add_argument('--amp-dtype', default='float16', help='mixed-precision dtype with --amp: float16 or bfloat16')
    g.add_argument('--device', default='cuda', help="'cpu' forces the CPU; otherwise Accelerate's device")
    g = p.add_argument_group('DropCluster')
    g.add_argument('--drop-cluster', type=float, default=None, metavar='RATE', help='target drop rate')
    g.add_argument('--drop-cluster-start', type=float, default=None, metavar='EPOCH',
                   help='first epoch with a non-zero rate (default: 20%% of --epochs; 25%% on the digits)')
    g.add_argument('--drop-cluster-warmup', type=float, default=None, metavar='EPOCHS',
                   help='epochs of the ramp to the target rate (default: 10%% of --epochs; 25%% on the digits)')
    g.add_argument('--drop-cluster-shape', default='linear', choices=SCHEDULE_SHAPES,
                   help='shape of the ramp to the target rate')
    g.add_argument('--drop-cluster-gamma', type=float, default=0.5,
                   help="factor of the 'exponential' and 'multistep' shapes: target * gamma ** steps to come")
    g.add_argument('--drop-cluster-milestones', type=float, nargs='+', default=[], metavar='EPOCH',
                   help="epochs where the 'multistep' shape rises")
    g.add_argument('--drop-cluster-update-freq', type=int, default=None, metavar='EPOCHS',
                   help='re-cluster every N epochs from the start epoch on (0: never; default: 10%% of '
                   '--epochs, at least 1; 25%% on the digits)')
    g.add_argument('--drop-cluster-update-batches', type=int, default=2, metavar='N',
                   help='batches of training images the clusters are computed from')
    for option in LAYER_OPTIONS:  # the layer options that have a flag (the others: --model-kwargs dc_<name>=...)
        if option.flag:
            g.add_argument(option.flag, **option.flag_kwargs())
    g.add_argument('--soft-reset-interval', type=int, default=0, metavar='EPOCHS',
                   help='BRB: every N epochs pull the weights toward a fresh init, then re-cluster (0: never)')
    g.add_argument('--soft-reset-factor', type=float, default=0.9, metavar='ALPHA', help='share of the weights kept')
    g.add_argument('--soft-reset-scope', nargs='+', default=[], metavar='NAME',
                   help='parameter name prefixes to reset, e.g. layer4 fc (default: all)')
    g = p.add_argument_group('EDropout (energy-based channel dropout and pruning; publishes the pruned model)')
    g.add_argument('--edropout', action='store_true',
                   help='evolve channel states in the drop_block slots of a timm ResNet and prune at the end')
    g.add_argument('--edropout-candidates', type=int, default=8, metavar='N', help='population size')
    g.add_argument('--edropout-interval', type=int, default=2, metavar='BATCHES', help='evolve every N batches')
    g.add_argument('--edropout-converge', type=int, default=100, metavar='STEPS',
                   help='stop evolving once the best state is unchanged for this many evolution steps (0: never)')
    g.add_argument('--edropout-keep-prob', type=float, default=0.5, metavar='P',
                   help='initial probability of a channel being on')
    g.add_argument('--edropout-batch', type=int, default=None, metavar='IMAGES',
                   help='images of each training batch every state is scored on (default: batch size / '
                        '(2 x candidates), one batch of images in the scoring forward)')
    g.add_argument('--edropout-stages', type=int, nargs='+', default=[1, 2, 3, 4], metavar='STAGE',
                   help='stages whose blocks get EDropout')
    g.add_argument('--edropout-unit', default='channel', choices=('channel', 'cluster'),
                   help="'cluster': choose the dropped clusters of a *_dropcluster model's layers by energy "
                        'instead of at random (no pruning)')
    g = p.add_argument_group('optimizer and learning rate (timm)')
    g.add_argument('--batch-size', '-b', type=int, default=None, help='per process')
    g.add_argument('--validation-batch-size', '-vb', type=int, default=None,
                   help='evaluation batch size per process (default: --batch-size)')
    g.add_argument('--grad-accum-steps', type=int, default=1, help='batches accumulated per optimizer step')
    g.add_argument('--opt', default=None, help='optimizer name in timm (default sgd; adamw on the digits)')
    g.add_argument('--opt-eps', type=float, default=None, help='optimizer epsilon')
    g.add_argument('--opt-betas', type=float, nargs='+', default=None, help='optimizer betas')
    g.add_argument('--momentum', type=float, default=0.9, help='SGD momentum')
    g.add_argument('--weight-decay', type=float, default=None, help='weight decay (default 2e-5; 0.05 on the digits)')
    g.add_argument('--clip-grad', type=float, default=None, help='clip gradients at this value (off by default)')
    g.add_argument('--clip-mode', default='norm', help='gradient clipping: norm, value or agc')
    g.add_argument('--layer-decay', type=float, default=None, help='layer-wise learning-rate decay')
    g.add_argument('--layer-decay-min-scale', type=float, default=0.0, help='smallest layer-wise learning-rate scale')
    g.add_argument('--layer-decay-no-opt-scale', type=float, default=None,
                   help='layers below this scale are not optimised')
    g.add_argument('--opt-kwargs', nargs='*', default={}, action=ParseKwargs,
                   help='more optimizer arguments, KEY=VALUE')
    g.add_argument('--lr', type=float, default=None, help='default: --lr-base scaled by the global batch size')
    g.add_argument('--lr-base', type=float, default=0.1,
                   help='learning rate at the reference batch size --lr-base-size')
    g.add_argument('--lr-base-size', type=int, default=256, help='the reference batch size of --lr-base')
    g.add_argument('--lr-base-scale', default='',
                   help='how --lr-base scales with the batch size: linear or sqrt (default: by optimizer)')
    g.add_argument('--sched', default='cosine',
                   help='learning-rate schedule in timm (cosine, step, multistep, plateau, ...)')
    g.add_argument('--sched-on-updates', action='store_true', default=None,
                   help='step the learning-rate schedule every optimizer update, not every epoch')
    g.add_argument('--lr-noise', type=float, nargs='+', default=None,
                   help='epoch range (fractions or epochs) with learning-rate noise')
    g.add_argument('--lr-noise-pct', type=float, default=0.67, help='learning-rate noise limit, as a fraction')
    g.add_argument('--lr-noise-std', type=float, default=1.0, help='learning-rate noise standard deviation')
    g.add_argument('--lr-cycle-mul', type=float, default=1.0, help='cycle length multiplier of the schedule')
    g.add_argument('--lr-cycle-decay', type=float, default=0.5, help='learning-rate decay per cycle')
    g.add_argument('--lr-cycle-limit', type=int, default=1, help='number of schedule cycles')
    g.add_argument('--lr-k-decay', type=float, default=1.0, help='k of the cosine and polynomial schedules')
    g.add_argument('--warmup-lr', type=float, default=1e-5, help='learning rate at the start of the warm-up')
    g.add_argument('--min-lr', type=float, default=0.0, help='lowest learning rate of the schedule')
    g.add_argument('--epochs', type=int, default=None, help='epochs to train (default 300; 12 on the digits)')
    g.add_argument('--epoch-repeats', type=float, default=0.0, help='repeat each epoch\'s data this many times (timm)')
    g.add_argument('--start-epoch', type=int, default=None, help='epoch to start from (default 0, or the resumed one)')
    g.add_argument('--decay-milestones', type=int, nargs='+', default=[90, 180, 270],
                   help='epochs where the \'multistep\' schedule decays')
    g.add_argument('--decay-epochs', type=float, default=90, help='epochs between decays of the \'step\' schedule')
    g.add_argument('--warmup-epochs', type=int, default=None,
                   help='learning-rate warm-up epochs (default 5; 1 on the digits)')
    g.add_argument('--cooldown-epochs', type=int, default=0, help='epochs at the lowest rate after the schedule')
    g.add_argument('--patience-epochs', type=int, default=10,
                   help='epochs without improvement before the \'plateau\' schedule decays')
    g.add_argument('--decay-rate', '--dr', type=float, default=0.1, help='learning-rate decay factor')
    g.add_argument('--warmup-prefix', action='store_true',
                   help='the warm-up comes before the schedule instead of inside it')
    g = p.add_argument_group('augmentation and regularisation (timm)')
    g.add_argument('--no-aug', action='store_true', help='no training augmentation')
    g.add_argument('--train-crop-mode', default=None, help='training crop mode of timm\'s transforms')
    g.add_argument('--scale', type=float, nargs=2, default=None,
                   help='random-resized-crop area range (default 0.08 1; 0.75 1 on the digits)')
    g.add_argument('--ratio', type=float, nargs=2, default=[3 / 4, 4 / 3],
                   help='random-resized-crop aspect-ratio range')
    g.add_argument('--hflip', type=float, default=None,
                   help='horizontal flip probability (default 0.5; 0 on the digits)')
    g.add_argument('--vflip', type=float, default=0.0, help='vertical flip probability')
    g.add_argument('--color-jitter', type=float, default=None,
                   help='colour jitter strength (default 0.4; off on the digits)')
    g.add_argument('--color-jitter-prob', type=float, default=None, help='probability of colour jitter')
    g.add_argument('--grayscale-prob', type=float, default=None, help='probability of turning an image grey')
    g.add_argument('--gaussian-blur-prob', type=float, default=None, help='probability of a Gaussian blur')
    g.add_argument('--aa', default=None, help='auto-augment policy, e.g. rand-m9-mstd0.5')
    g.add_argument('--aug-repeats', type=float, default=0, help='repeated augmentation: copies of each image per epoch')
    g.add_argument('--bce-loss', action='store_true', help='binary cross-entropy instead of cross-entropy')
    g.add_argument('--bce-sum', action='store_true', help='sum the binary cross-entropy over classes')
    g.add_argument('--bce-target-thresh', type=float, default=None,
                   help='binarise the targets of the binary cross-entropy at this threshold')
    g.add_argument('--bce-pos-weight', type=float, default=None,
                   help='positive-class weight of the binary cross-entropy')
    g.add_argument('--reprob', type=float, default=0.0, help='random-erasing probability')
    g.add_argument('--remode', default='pixel', help='random-erasing fill: const, rand or pixel')
    g.add_argument('--recount', type=int, default=1, help='random-erasing boxes per image')
    g.add_argument('--mixup', type=float, default=0.0, help='mixup alpha (0: off)')
    g.add_argument('--cutmix', type=float, default=0.0, help='CutMix alpha (0: off)')
    g.add_argument('--cutmix-minmax', type=float, nargs='+', default=None,
                   help='CutMix box-size range, overrides --cutmix')
    g.add_argument('--mixup-prob', type=float, default=1.0, help='probability of mixup or CutMix per batch')
    g.add_argument('--mixup-switch-prob', type=float, default=0.5,
                   help='probability of CutMix instead of mixup when both are on')
    g.add_argument('--mixup-mode', default='batch', help='mixup per batch, pair or elem')
    g.add_argument('--mixup-off-epoch', type=int, default=0, help='turn mixup off from this epoch (0: never)')
    g.add_argument('--smoothing', type=float, default=None, help='label smoothing (default 0.1; 0 on the digits)')
    g.add_argument('--train-interpolation', default=None,
                   help='training resize interpolation (default random; the model\'s on the digits)')
    g.add_argument('--model-ema', action='store_true',
                   help='keep an exponential moving average of the weights; it is evaluated and published')
    g.add_argument('--model-ema-force-cpu', action='store_true', help='keep the average on the CPU')
    g.add_argument('--model-ema-decay', type=float, default=0.9998, help='decay of the weight average')
    g.add_argument('--model-ema-warmup', action='store_true',
                   help='warm the average\'s decay up over the first updates')
    g.add_argument('--seed', type=int, default=42, help='random seed of the run')
    g = p.add_argument_group('output, logging and processes')
    g.add_argument('--output', default='output/train', help='run folder: checkpoints/, best/, last/, metrics')
    g.add_argument('--experiment', default='', help='a sub-folder of --output for this run')
    g.add_argument('--resume', default=None, help='an output folder (its newest checkpoint) or a checkpoint')
    g.add_argument('--no-resume-opt', action='store_true', help='resume without the optimizer state')
    g.add_argument('--overwrite', action='store_true',
                   help="replace an earlier run's results in --output (without it such a folder is refused)")
    g.add_argument('--recovery-interval', '--checkpoint-steps', dest='checkpoint_steps', type=int, default=0,
                   help='also checkpoint every N batches')
    g.add_argument('--checkpoint-hist', type=int, default=None, help='checkpoints kept')
    g.add_argument('--eval-metric', default='top1', help="picks best/: top1, top5 or loss")
    g.add_argument('--log-interval', type=int, default=50, help='a progress line every N batches (off a terminal)')
    g.add_argument('--val-interval', type=int, default=1, help='evaluate every N epochs (and at the last)')
    g.add_argument('--train-batches-per-epoch', '--train-steps-per-epoch', type=int, default=None,
                   help='stop each epoch after this many batches')
    g.add_argument('--log-with', default=None, help='accelerate tracker, e.g. tensorboard')
    g.add_argument('--log-wandb', action='store_true', help='the wandb tracker (--log-with wandb)')
    g.add_argument('--wandb-project', default=None, help='wandb project of --log-wandb')
    g.add_argument('--wandb-tags', nargs='+', default=[], help='wandb tags of --log-wandb')
    g.add_argument('--push-to-hub', default=None, metavar='ORG/NAME',
                   help='push best/ to this Hub repo at the end (token from HF_TOKEN or hf auth login)')
    g.add_argument('--no-progress', action='store_true', help='no progress bars')
    g.add_argument('--no-ddp-bb', action='store_true', help='do not broadcast BatchNorm buffers in DDP')
    g.add_argument('--dist-bn', default='reduce',
                   help='BatchNorm statistics across processes after each epoch: reduce, broadcast or \'\' (none)')
    g.add_argument('--synchronize-step', action='store_true',
                   help='synchronise the device after every step (for timing)')
    g.add_argument('--local_rank', type=int, default=0, help=argparse.SUPPRESS)  # torch.distributed.launch's
    for flag in ('--no-prefetcher', '--use-multi-epochs-loader'):  # timm loader options, nothing to do here
        g.add_argument(flag, action='store_true', help=argparse.SUPPRESS)
    r = p.add_argument_group('timm flags not supported here (an error when set)')
    for name, (default, _) in REFUSED.items():
        flag = '--' + name.replace('_', '-')
        if isinstance(default, bool):
            r.add_argument(flag, action='store_true', help=argparse.SUPPRESS)
        else:
            r.add_argument(flag, default=default, nargs='*' if default is None else None, help=argparse.SUPPRESS)
    return p


def _tuple(value: Optional[Sequence]) -> Optional[Tuple]:
    return tuple(value) if value is not None else None


def _refuse(a: argparse.Namespace) -> None:
    for name, (default, why) in REFUSED.items():
        value = getattr(a, name)
        if value not in (default, str(default)) and not (default is None and value == []):
            raise TrainingError(f'--{name.replace("_", "-")} is not supported: {why}')
    if a.device not in ('cuda', 'cpu') and not a.device.startswith('cuda:'):
        raise TrainingError(f'--device {a.device}: Accelerate picks the device; use --device cpu or accelerate launch')


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The typed settings of a parsed ``train`` command line, with the data-dependent defaults filled in."""
    a = argparse.Namespace(**vars(args))  # the caller's namespace stays as it was
    _refuse(a)
    a.data_dir = a.data_dir or getattr(a, 'data_dir_pos', None)
    embedded = not a.data_dir and a.dataset in ('', EMBEDDED_DATASET)
    defaults = dict(EMBEDDED_DEFAULTS if embedded else GENERAL_DEFAULTS)
    start, warmup, update = defaults.pop('drop_cluster_fractions')
    if 'dropcluster' not in (a.model or defaults['model']):
        for key in _DROPCLUSTER_MODEL_DEFAULTS:  # arguments only a *_dropcluster model takes
            defaults.pop(key, None)
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    output = a.output if not a.experiment else f'{a.output.rstrip("/")}/{a.experiment}'
    recorded = {k: v for k, v in vars(a).items() if k not in ('data_dir_pos', 'drop_cluster_fractions')}
    return TrainConfig(
        data=DataConfig(
            dataset=EMBEDDED_DATASET if embedded else a.dataset, data_dir=a.data_dir, train_split=a.train_split,
            val_split=a.val_split, num_classes=a.num_classes, class_map=a.class_map,
            train_num_samples=a.train_num_samples, val_num_samples=a.val_num_samples,
            dataset_download=a.dataset_download, input_img_mode=a.input_img_mode, input_key=a.input_key,
            target_key=a.target_key, dataset_trust_remote_code=a.dataset_trust_remote_code,
            epoch_repeats=a.epoch_repeats, workers=a.workers, pin_mem=a.pin_mem, aug_repeats=a.aug_repeats,
            img_size=a.img_size, in_chans=a.in_chans, input_size=_tuple(a.input_size), crop_pct=a.crop_pct,
            mean=_tuple(a.mean), std=_tuple(a.std), interpolation=a.interpolation, no_aug=a.no_aug,
            train_crop_mode=a.train_crop_mode, scale=tuple(a.scale), ratio=tuple(a.ratio), hflip=a.hflip,
            vflip=a.vflip, color_jitter=a.color_jitter, color_jitter_prob=a.color_jitter_prob,
            grayscale_prob=a.grayscale_prob, gaussian_blur_prob=a.gaussian_blur_prob, auto_augment=a.aa,
            re_prob=a.reprob, re_mode=a.remode, re_count=a.recount, train_interpolation=a.train_interpolation),
        model=ModelConfig(
            name=a.model, pretrained=a.pretrained, pretrained_path=a.pretrained_path,
            initial_checkpoint=a.initial_checkpoint, drop_rate=a.drop,
            drop_path_rate=a.drop_path if a.drop_path is not None else a.drop_connect,
            drop_block_rate=a.drop_block, bn_momentum=a.bn_momentum, bn_eps=a.bn_eps, global_pool=a.gp,
            layer_options={o.name: getattr(a, o.dest) for o in LAYER_OPTIONS
                           if o.flag and getattr(a, o.dest) is not None},
            kwargs=dict(a.model_kwargs or {}), head_init_scale=a.head_init_scale, head_init_bias=a.head_init_bias,
            grad_checkpointing=a.grad_checkpointing, channels_last=a.channels_last, fast_norm=a.fast_norm,
            sync_bn=a.sync_bn, torchcompile=a.torchcompile, torchcompile_mode=a.torchcompile_mode),
        dropcluster=DropClusterConfig(
            rate=a.drop_cluster,
            start_epoch=a.drop_cluster_start if a.drop_cluster_start is not None else round(start * a.epochs, 4),
            warmup_epochs=a.drop_cluster_warmup if a.drop_cluster_warmup is not None else round(warmup * a.epochs, 4),
            shape=a.drop_cluster_shape, gamma=a.drop_cluster_gamma, milestones=list(a.drop_cluster_milestones),
            update_freq=(a.drop_cluster_update_freq if a.drop_cluster_update_freq is not None
                         else max(1, round(update * a.epochs))),
            update_batches=a.drop_cluster_update_batches, soft_reset_interval=a.soft_reset_interval,
            soft_reset_factor=a.soft_reset_factor, soft_reset_scope=list(a.soft_reset_scope)),
        edropout=EDropoutConfig(
            enabled=a.edropout, candidates=a.edropout_candidates, interval=a.edropout_interval,
            converge_steps=a.edropout_converge, keep_prob=a.edropout_keep_prob, batch_per_state=a.edropout_batch,
            stages=list(a.edropout_stages), unit=a.edropout_unit),
        optim=OptimConfig(
            epochs=a.epochs, start_epoch=a.start_epoch, batch_size=a.batch_size,
            validation_batch_size=a.validation_batch_size, grad_accum_steps=a.grad_accum_steps, opt=a.opt, lr=a.lr,
            lr_base=a.lr_base, lr_base_size=a.lr_base_size, lr_base_scale=a.lr_base_scale, momentum=a.momentum,
            weight_decay=a.weight_decay, opt_eps=a.opt_eps, opt_betas=a.opt_betas, layer_decay=a.layer_decay,
            layer_decay_min_scale=a.layer_decay_min_scale, layer_decay_no_opt_scale=a.layer_decay_no_opt_scale,
            opt_kwargs=dict(a.opt_kwargs or {}), clip_grad=a.clip_grad, clip_mode=a.clip_mode, sched=a.sched,
            sched_on_updates=a.sched_on_updates, warmup_epochs=a.warmup_epochs, warmup_lr=a.warmup_lr,
            warmup_prefix=a.warmup_prefix, min_lr=a.min_lr, cooldown_epochs=a.cooldown_epochs,
            patience_epochs=a.patience_epochs, decay_epochs=a.decay_epochs, decay_milestones=list(a.decay_milestones),
            decay_rate=a.decay_rate, lr_noise=a.lr_noise, lr_noise_pct=a.lr_noise_pct, lr_noise_std=a.lr_noise_std,
            lr_cycle_mul=a.lr_cycle_mul, lr_cycle_decay=a.lr_cycle_decay, lr_cycle_limit=a.lr_cycle_limit,
            lr_k_decay=a.lr_k_decay, eval_metric=a.eval_metric, amp=a.amp, amp_dtype=a.amp_dtype,
            model_ema=a.model_ema, model_ema_decay=a.model_ema_decay, model_ema_warmup=a.model_ema_warmup,
            model_ema_force_cpu=a.model_ema_force_cpu, seed=a.seed),
        loss=LossConfig(
            smoothing=a.smoothing, bce_loss=a.bce_loss, bce_sum=a.bce_sum, bce_target_thresh=a.bce_target_thresh,
            bce_pos_weight=a.bce_pos_weight, mixup=a.mixup, cutmix=a.cutmix, cutmix_minmax=a.cutmix_minmax,
            mixup_prob=a.mixup_prob, mixup_switch_prob=a.mixup_switch_prob, mixup_mode=a.mixup_mode,
            mixup_off_epoch=a.mixup_off_epoch),
        output=OutputConfig(
            output=output, resume=a.resume, no_resume_opt=a.no_resume_opt, overwrite=a.overwrite, checkpoint_steps=a.checkpoint_steps,
            checkpoint_hist=a.checkpoint_hist, log_with='wandb' if a.log_wandb else a.log_with,
            wandb_project=a.wandb_project, wandb_tags=list(a.wandb_tags), log_interval=a.log_interval,
            val_interval=a.val_interval, push_to_hub=a.push_to_hub, progress=not a.no_progress,
            cpu=a.device == 'cpu', no_ddp_bb=a.no_ddp_bb, dist_bn=a.dist_bn, synchronize_step=a.synchronize_step,
            train_batches_per_epoch=a.train_batches_per_epoch,
            args_yaml=yaml.safe_dump(recorded, default_flow_style=False)),
    )


def _read_config_file(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise TrainingError(f'-c {path}: cannot read it ({type(e).__name__}: {e})') from e
    if not isinstance(values, dict):
        raise TrainingError(f'-c {path}: expected a mapping of argument names to values')
    known = {a.dest for a in parser._actions}
    unknown = sorted(k for k in values if k.replace('-', '_') not in known)
    if unknown:
        raise TrainingError(f'-c {path}: unknown arguments {", ".join(unknown)}')
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
        parser.set_defaults(**_read_config_file(first.config, parser))
    return parser.parse_args(argv)
