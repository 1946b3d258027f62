""" The sections of a run's settings, one dataclass each; every field is one training option.

Field names follow timm's ``train.py`` arguments, so timm's own helpers read a section directly
(``timm.optim.optimizer_kwargs(cfg.optim)``, ``timm.scheduler.scheduler_kwargs(cfg.optim)``). Each
field is declared once with ``option(default, help, ...)``: its flag, help and checks come from it
(``train/options.py``). The defaults are timm's; ``config.EMBEDDED_DEFAULTS`` is what the embedded
digits run sets instead.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from ..data import EMBEDDED_DATASET
from ..layers.schedules import SCHEDULE_SHAPES
from ..models.names import EDROPOUT_UNITS
from .options import AT_LEAST_ONE, NOT_NEGATIVE, POSITIVE, UNIT_RATE, Bound, option

__all__ = ['GROUPS', 'DataConfig', 'ModelConfig', 'DropClusterConfig', 'EDropoutConfig', 'OptimConfig', 'LossConfig',
           'OutputConfig']

# --help sections: one per config section, and the augmentation options of several sections together
GROUPS = {
    'data': 'data (none given: the embedded scikit-learn digits data set)',
    'model': 'model',
    'dropcluster': 'DropCluster',
    'edropout': 'EDropout (energy-based channel dropout and pruning; publishes the pruned model)',
    'optim': 'optimizer and learning rate (timm)',
    'loss': 'augmentation and regularisation (timm)',
    'output': 'output, logging and processes',
}
AUG, OPTIM, MODEL, OUTPUT = GROUPS['loss'], GROUPS['optim'], GROUPS['model'], GROUPS['output']
THE_MODELS = "the model's"


@dataclass
class DataConfig:
    """The data set, its splits, the loaders and the input pipeline (timm's data arguments)."""
    data_dir: Optional[str] = option(None, 'ImageFolder root (with train/ and validation/ or val/)')
    dataset: str = option('', f'timm dataset name (torch/..., hfds/..., wds/...); "" = ImageFolder, '
                          f'"{EMBEDDED_DATASET}" = embedded')
    train_split: str = option('train', 'training split folder or name (else "training")')
    val_split: str = option('validation', 'validation split (else val, valid, eval, evaluation or test)')
    train_num_samples: Optional[int] = option(None, 'training samples of an iterable data set (timm)')
    val_num_samples: Optional[int] = option(None, 'validation samples of an iterable data set (timm)')
    dataset_download: bool = option(False, 'let a torchvision data set download itself')
    class_map: str = option('', 'file mapping folder names to class indices (timm)')
    input_img_mode: Optional[str] = option(None, 'image mode the data set converts to, e.g. RGB (timm)')
    input_key: Optional[str] = option(None, 'image field of a Hugging Face or WebDataset data set')
    target_key: Optional[str] = option(None, 'label field of a Hugging Face or WebDataset data set')
    dataset_trust_remote_code: bool = option(False, "run a Hub data set's own loading code")
    num_classes: Optional[int] = option(None, 'checked against the data set')
    # timm's resolve_data_config settings (None: the model's own)
    img_size: Optional[int] = option(None, 'input size in pixels', bound=AT_LEAST_ONE, unset=THE_MODELS)
    in_chans: Optional[int] = option(None, 'input channels', bound=AT_LEAST_ONE)
    input_size: Optional[Tuple[int, int, int]] = option(None, 'input size as channels height width',
                                                        metavar=('C', 'H', 'W'))
    crop_pct: Optional[float] = option(None, 'evaluation centre-crop fraction')
    mean: Optional[Tuple[float, ...]] = option(None, 'normalisation mean per channel')
    std: Optional[Tuple[float, ...]] = option(None, 'normalisation standard deviation per channel')
    interpolation: str = option('', "resize interpolation for evaluation (default: the model's)")
    workers: int = option(4, 'data-loading processes per training process', aliases=('-j',), bound=NOT_NEGATIVE)
    pin_mem: bool = option(False, 'pinned host memory (always on for a GPU)')
    epoch_repeats: float = option(0.0, "repeat each epoch's data this many times (timm)", group=OPTIM)
    # timm's create_transform settings of the training images
    no_aug: bool = option(False, 'no training augmentation', group=AUG)
    train_crop_mode: Optional[str] = option(None, "training crop mode of timm's transforms", group=AUG)
    scale: Tuple[float, float] = option((0.08, 1.0), 'random-resized-crop area range', group=AUG)
    ratio: Tuple[float, float] = option((3 / 4, 4 / 3), 'random-resized-crop aspect-ratio range', group=AUG)
    hflip: float = option(0.5, 'horizontal flip probability', bound=Bound(0, 1), group=AUG)
    vflip: float = option(0.0, 'vertical flip probability', bound=Bound(0, 1), group=AUG)
    color_jitter: Optional[float] = option(0.4, 'colour jitter strength', group=AUG)
    color_jitter_prob: Optional[float] = option(None, 'probability of colour jitter', group=AUG)
    grayscale_prob: Optional[float] = option(None, 'probability of turning an image grey', group=AUG)
    gaussian_blur_prob: Optional[float] = option(None, 'probability of a Gaussian blur', group=AUG)
    auto_augment: Optional[str] = option(None, 'auto-augment policy, e.g. rand-m9-mstd0.5', flag='--aa', group=AUG)
    aug_repeats: float = option(0.0, 'repeated augmentation: copies of each image per epoch', bound=NOT_NEGATIVE,
                                group=AUG)
    re_prob: float = option(0.0, 'random-erasing probability', flag='--reprob', bound=UNIT_RATE, group=AUG)
    re_mode: str = option('pixel', 'random-erasing fill: const, rand or pixel', flag='--remode', group=AUG)
    re_count: int = option(1, 'random-erasing boxes per image', flag='--recount', group=AUG)
    train_interpolation: str = option('random', 'training resize interpolation', group=AUG, unset=THE_MODELS)

    def dataset_args(self) -> Dict[str, Any]:
        """The ``timm.data.create_dataset`` settings besides name, root and split."""
        args = dict(download=self.dataset_download, repeats=self.epoch_repeats,
                    trust_remote_code=self.dataset_trust_remote_code)
        for key in ('class_map', 'input_img_mode', 'input_key', 'target_key'):
            if getattr(self, key):
                args[key] = getattr(self, key)
        return args

    def input_args(self) -> Dict[str, Any]:
        """The settings ``timm.data.resolve_data_config`` reads."""
        return {k: getattr(self, k) for k in ('img_size', 'in_chans', 'input_size', 'crop_pct', 'mean', 'std',
                                              'interpolation')}

    def train_transform_args(self) -> Dict[str, Any]:
        """The augmentation settings ``timm.data.create_transform`` takes for training."""
        args = {k: getattr(self, k) for k in ('no_aug', 'train_crop_mode', 'scale', 'ratio', 'hflip', 'vflip',
                                              'color_jitter', 'color_jitter_prob', 'auto_augment', 're_prob',
                                              're_mode', 're_count')}
        args.update(grayscale_prob=self.grayscale_prob or 0.0, gaussian_blur_prob=self.gaussian_blur_prob or 0.0)
        if self.train_interpolation:  # '': the evaluation interpolation
            args['interpolation'] = self.train_interpolation
        return args


@dataclass
class ModelConfig:
    """The model: a timm name (or ``hf-hub:`` / ``local-dir:``), its arguments and how it runs."""
    name: str = option('resnet50_dropcluster', 'timm model name', flag='--model')
    pretrained: bool = option(False, "start from timm's pretrained weights of the model")
    pretrained_path: Optional[str] = option(None, "a local weights file to use as the model's pretrained weights "
                                            'with --pretrained')
    initial_checkpoint: str = option('', "a weights file loaded into the model before training (timm's "
                                     'load_checkpoint)')
    global_pool: Optional[str] = option(None, 'global pool type', flag='--gp')
    drop_rate: Optional[float] = option(None, 'classifier dropout', flag='--drop', bound=UNIT_RATE)
    drop_path_rate: Optional[float] = option(None, 'stochastic depth rate', flag='--drop-path', bound=UNIT_RATE)
    drop_block_rate: Optional[float] = option(None, 'DropBlock rate, ramped like --drop-cluster', flag='--drop-block',
                                              bound=UNIT_RATE)
    bn_momentum: Optional[float] = option(None, 'BatchNorm momentum')
    bn_eps: Optional[float] = option(None, 'BatchNorm epsilon')
    kwargs: Dict[str, Any] = option({}, 'more model arguments, e.g. dc_stem=True dc_stages=[2,3,4]',
                                    flag='--model-kwargs')
    # DropCluster layer options set for this run ({name: value}); the others keep the model's defaults.
    # Declared in layers/options.py (LAYER_OPTIONS), which gives them their flags.
    layer_options: Dict[str, Any] = option({}, 'DropCluster layer options of the run', flag='')
    head_init_scale: Optional[float] = option(None, "scale of the classifier's initial weights")
    head_init_bias: Optional[float] = option(None, 'initial bias of the classifier')
    grad_checkpointing: bool = option(False, 'recompute activations in the backward to save memory')
    channels_last: bool = option(False, 'channels-last memory format')
    fast_norm: bool = option(False, "timm's fast normalisation layers (lower precision)")
    sync_bn: bool = option(False, 'synchronise BatchNorm statistics across processes')
    torchcompile: Optional[str] = option(None, 'torch.compile the model with this backend (default inductor)',
                                         const='inductor', metavar='BACKEND')
    torchcompile_mode: Optional[str] = option(None, 'torch.compile mode, e.g. max-autotune')


def _share_of_epochs(index: int, at_least: str = '') -> Any:
    return lambda cfg: f'{cfg.dropcluster.epoch_fractions[index]:.0%} of --epochs{at_least}'


@dataclass
class DropClusterConfig:
    """The drop-rate ramp and the periodic re-clustering (``DropClusterSchedule``); with a plain timm
    model and ``--drop-block``, the same ramp drives its DropBlock layers. ``start_epoch``,
    ``warmup_epochs`` and ``update_freq`` left at None are shares of the run's epochs
    (``epoch_fractions``), filled in by ``TrainConfig.resolved``."""
    rate: float = option(0.1, 'target drop rate', flag='--drop-cluster', metavar='RATE', bound=UNIT_RATE)
    start_epoch: Optional[float] = option(None, 'first epoch with a non-zero rate', flag='--drop-cluster-start',
                                          metavar='EPOCH', bound=NOT_NEGATIVE, unset=_share_of_epochs(0))
    warmup_epochs: Optional[float] = option(None, 'epochs of the ramp to the target rate',
                                            flag='--drop-cluster-warmup', metavar='EPOCHS', bound=NOT_NEGATIVE,
                                            unset=_share_of_epochs(1))
    shape: str = option('linear', 'shape of the ramp to the target rate', flag='--drop-cluster-shape',
                        choices=SCHEDULE_SHAPES)
    gamma: float = option(0.5, "factor of the 'exponential' and 'multistep' shapes: target * gamma ** steps to come",
                          flag='--drop-cluster-gamma', bound=Bound(0, 1, low_open=True))
    milestones: List[float] = option([], "epochs where the 'multistep' shape rises", flag='--drop-cluster-milestones',
                                     metavar='EPOCH')
    update_freq: Optional[int] = option(None, 're-cluster every N epochs from the start epoch on, 0: never',
                                        flag='--drop-cluster-update-freq', metavar='EPOCHS', bound=NOT_NEGATIVE,
                                        unset=_share_of_epochs(2, ', at least 1'))
    update_batches: int = option(2, 'batches of training images the clusters are computed from',
                                 flag='--drop-cluster-update-batches', metavar='N', bound=AT_LEAST_ONE)
    epoch_fractions: Tuple[float, float, float] = option(
        (0.2, 0.1, 0.1), 'start, warm-up and re-clustering interval as shares of the epochs, where not given',
        flag='', bound=NOT_NEGATIVE)
    soft_reset_interval: int = option(0, 'BRB: every N epochs pull the weights toward a fresh init, then re-cluster '
                                      '(0: never)', metavar='EPOCHS', bound=NOT_NEGATIVE)
    soft_reset_factor: float = option(0.9, 'share of the weights kept', metavar='ALPHA', bound=UNIT_RATE)
    soft_reset_scope: List[str] = option([], 'parameter name prefixes to reset, e.g. layer4 fc (default: all)',
                                         metavar='NAME')

    def resolved(self, epochs: int) -> 'DropClusterConfig':
        """A copy with the unset start, warm-up and re-clustering interval as shares of ``epochs``."""
        start, warmup, update = self.epoch_fractions
        return DropClusterConfig(**dict(
            vars(self),
            start_epoch=self.start_epoch if self.start_epoch is not None else round(start * epochs, 4),
            warmup_epochs=self.warmup_epochs if self.warmup_epochs is not None else round(warmup * epochs, 4),
            update_freq=self.update_freq if self.update_freq is not None else max(1, round(update * epochs))))


@dataclass
class EDropoutConfig:
    """EDropout (``dropcluster_timm.edropout.layers``): energy-based channel states in the blocks' drop_block
    slots, evolved during training; the published model is the pruned one. Defaults: the paper's."""
    enabled: bool = option(False, 'evolve channel states in the drop_block slots of a timm ResNet and prune at the '
                           'end', flag='--edropout')
    candidates: int = option(8, 'population size (at least 4: the evolution mixes three other states)',
                             flag='--edropout-candidates', metavar='N', bound=Bound(4))
    interval: int = option(2, 'evolve every N batches', flag='--edropout-interval', metavar='BATCHES',
                           bound=AT_LEAST_ONE)
    converge_steps: int = option(100, 'stop evolving once the best state is unchanged for this many evolution steps '
                                 '(0: never)', flag='--edropout-converge', metavar='STEPS', bound=NOT_NEGATIVE)
    keep_prob: float = option(0.5, 'initial probability of a channel being on', flag='--edropout-keep-prob',
                              metavar='P', bound=Bound(0, 1, low_open=True))
    batch_per_state: Optional[int] = option(None, 'images of each training batch every state is scored on '
                                            '(default: batch size / (2 x candidates), one batch of images in the '
                                            'scoring forward)', flag='--edropout-batch', metavar='IMAGES',
                                            bound=AT_LEAST_ONE)
    stages: List[int] = option([1, 2, 3, 4], 'stages whose blocks get EDropout', flag='--edropout-stages',
                               metavar='STAGE', choices=(1, 2, 3, 4))
    unit: str = option('channel', "'cluster': choose the dropped clusters of a *_dropcluster model's layers by "
                       'energy instead of at random (no pruning)', flag='--edropout-unit',
                       choices=EDROPOUT_UNITS)

    def images_per_state(self, batch_size: int) -> int:
        """``batch_per_state``, by default ``batch_size / (2 * candidates)``: the scoring forward of the
        2 x candidates states then holds one batch of images, about 0.3 of a training step (docs/benchmarks.md)."""
        return self.batch_per_state or max(1, batch_size // (2 * self.candidates))


@dataclass
class OptimConfig:
    """Optimizer, learning rate and its schedule, precision, EMA and the seed (timm's names)."""
    batch_size: int = option(128, 'per process', aliases=('-b',), bound=AT_LEAST_ONE)
    validation_batch_size: Optional[int] = option(None, 'evaluation batch size per process (default: --batch-size)',
                                                  aliases=('-vb',), bound=AT_LEAST_ONE)
    grad_accum_steps: int = option(1, 'batches accumulated per optimizer step', bound=AT_LEAST_ONE)
    opt: str = option('sgd', 'optimizer name in timm')
    opt_eps: Optional[float] = option(None, 'optimizer epsilon')
    opt_betas: Optional[List[float]] = option(None, 'optimizer betas')
    momentum: float = option(0.9, 'SGD momentum')
    weight_decay: float = option(2e-5, 'weight decay', bound=NOT_NEGATIVE)
    clip_grad: Optional[float] = option(None, 'clip gradients at this value (off by default)')
    clip_mode: str = option('norm', 'gradient clipping', choices=('norm', 'value', 'agc'))
    layer_decay: Optional[float] = option(None, 'layer-wise learning-rate decay')
    layer_decay_min_scale: float = option(0.0, 'smallest layer-wise learning-rate scale')
    layer_decay_no_opt_scale: Optional[float] = option(None, 'layers below this scale are not optimised')
    opt_kwargs: Dict[str, Any] = option({}, 'more optimizer arguments')
    lr: Optional[float] = option(None, 'learning rate', bound=POSITIVE,
                                 unset='--lr-base scaled by the global batch size')
    lr_base: float = option(0.1, 'learning rate at the reference batch size --lr-base-size', bound=POSITIVE)
    lr_base_size: int = option(256, 'the reference batch size of --lr-base', bound=AT_LEAST_ONE)
    lr_base_scale: str = option('', 'how --lr-base scales with the batch size (default: by optimizer)',
                                choices=('', 'linear', 'sqrt'))
    sched: str = option('cosine', 'learning-rate schedule in timm (cosine, step, multistep, plateau, ...)')
    sched_on_updates: bool = option(False, 'step the learning-rate schedule every optimizer update, not every epoch')
    lr_noise: Optional[List[float]] = option(None, 'epoch range (fractions or epochs) with learning-rate noise')
    lr_noise_pct: float = option(0.67, 'learning-rate noise limit, as a fraction')
    lr_noise_std: float = option(1.0, 'learning-rate noise standard deviation')
    lr_cycle_mul: float = option(1.0, 'cycle length multiplier of the schedule')
    lr_cycle_decay: float = option(0.5, 'learning-rate decay per cycle')
    lr_cycle_limit: int = option(1, 'number of schedule cycles')
    lr_k_decay: float = option(1.0, 'k of the cosine and polynomial schedules')
    warmup_lr: float = option(1e-5, 'learning rate at the start of the warm-up')
    min_lr: float = option(0.0, 'lowest learning rate of the schedule', bound=NOT_NEGATIVE)
    epochs: int = option(300, 'epochs to train', bound=AT_LEAST_ONE)
    start_epoch: Optional[int] = option(None, 'epoch to start from (default 0, or the resumed one)',
                                        bound=NOT_NEGATIVE)
    decay_milestones: List[int] = option([90, 180, 270], "epochs where the 'multistep' schedule decays")
    decay_epochs: float = option(90, "epochs between decays of the 'step' schedule")
    warmup_epochs: int = option(5, 'learning-rate warm-up epochs', bound=NOT_NEGATIVE)
    cooldown_epochs: int = option(0, 'epochs at the lowest rate after the schedule')
    patience_epochs: int = option(10, "epochs without improvement before the 'plateau' schedule decays")
    decay_rate: float = option(0.1, 'learning-rate decay factor', aliases=('--dr',))
    warmup_prefix: bool = option(False, 'the warm-up comes before the schedule instead of inside it')
    amp: bool = option(False, 'mixed precision (Accelerate)', group=MODEL)
    amp_dtype: str = option('float16', 'mixed-precision dtype with --amp', choices=('float16', 'bfloat16'),
                            group=MODEL)
    model_ema: bool = option(False, 'keep an exponential moving average of the weights; it is evaluated and '
                             'published', group=AUG)
    model_ema_force_cpu: bool = option(False, 'keep the average on the CPU', group=AUG)
    model_ema_decay: float = option(0.9998, 'decay of the weight average', bound=Bound(0, 1, True, True), group=AUG)
    model_ema_warmup: bool = option(False, "warm the average's decay up over the first updates", group=AUG)
    seed: int = option(42, 'random seed of the run', group=AUG)
    eval_metric: str = option('top1', 'picks best/', choices=('top1', 'top5', 'eval_loss', 'loss'), group=OUTPUT)

    def scaled_lr(self, global_batch_size: int) -> float:
        """``lr``, or as timm's train.py: ``lr_base`` times ``global_batch_size / lr_base_size`` (its
        square root for the Ada* and LAMB optimizers, or as ``lr_base_scale`` says)."""
        if self.lr:
            return self.lr
        scale = self.lr_base_scale or ('sqrt' if any(o in self.opt.lower() for o in ('ada', 'lamb')) else 'linear')
        ratio = global_batch_size / self.lr_base_size
        return self.lr_base * (ratio ** 0.5 if scale == 'sqrt' else ratio)


@dataclass
class LossConfig:
    """The training loss and mixing (timm's names)."""
    bce_loss: bool = option(False, 'binary cross-entropy instead of cross-entropy')
    bce_sum: bool = option(False, 'sum the binary cross-entropy over classes')
    bce_target_thresh: Optional[float] = option(None, 'binarise the targets of the binary cross-entropy at this '
                                                'threshold')
    bce_pos_weight: Optional[float] = option(None, 'positive-class weight of the binary cross-entropy')
    mixup: float = option(0.0, 'mixup alpha (0: off)', bound=NOT_NEGATIVE)
    cutmix: float = option(0.0, 'CutMix alpha (0: off)', bound=NOT_NEGATIVE)
    cutmix_minmax: Optional[List[float]] = option(None, 'CutMix box-size range, overrides --cutmix')
    mixup_prob: float = option(1.0, 'probability of mixup or CutMix per batch', bound=Bound(0, 1))
    mixup_switch_prob: float = option(0.5, 'probability of CutMix instead of mixup when both are on',
                                      bound=Bound(0, 1))
    mixup_mode: str = option('batch', 'mixup per batch, pair or elem', choices=('batch', 'pair', 'elem'))
    mixup_off_epoch: int = option(0, 'turn mixup off from this epoch (0: never)', bound=NOT_NEGATIVE)
    smoothing: float = option(0.1, 'label smoothing', bound=UNIT_RATE)


@dataclass
class OutputConfig:
    """The run folder, checkpoints, logging, publishing and how processes cooperate."""
    output: Optional[str] = option(None, 'run folder: checkpoints/, best/, last/, metrics (default output/train; '
                                   "with --resume, the resumed run's folder)")
    resume: Optional[str] = option(None, 'an output folder (its newest checkpoint) or a checkpoint')
    no_resume_opt: bool = option(False, 'resume without the optimizer state')
    overwrite: bool = option(False, "replace an earlier run's results in --output (without it such a folder is "
                             'refused)')
    checkpoint_steps: int = option(0, 'also checkpoint every N batches', flag='--recovery-interval',
                                   aliases=('--checkpoint-steps',), dest='checkpoint_steps', bound=NOT_NEGATIVE)
    checkpoint_hist: int = option(10, 'checkpoints kept', bound=NOT_NEGATIVE)
    log_interval: int = option(50, 'a progress line every N batches (off a terminal)', bound=AT_LEAST_ONE)
    val_interval: int = option(1, 'evaluate every N epochs (and at the last)', bound=AT_LEAST_ONE)
    train_batches_per_epoch: Optional[int] = option(None, 'stop each epoch after this many batches',
                                                    aliases=('--train-steps-per-epoch',), bound=AT_LEAST_ONE)
    log_with: Optional[str] = option(None, 'accelerate tracker, e.g. tensorboard')
    wandb_project: Optional[str] = option(None, 'wandb project of --log-wandb')
    wandb_tags: List[str] = option([], 'wandb tags of --log-wandb')
    push_to_hub: Optional[str] = option(None, 'push best/ to this Hub repo at the end (token from HF_TOKEN or hf auth '
                                        'login)', metavar='ORG/NAME')
    progress: bool = option(True, 'no progress bars')
    cpu_threads: Optional[int] = option(None, "threads of each process on the CPU (default: its share of the cores; 0: "
                                        "leave PyTorch's setting); the caller's setting is restored after the run",
                                        bound=NOT_NEGATIVE)
    cpu: bool = option(False, "run on the CPU (the command line's --device cpu)", flag='')
    no_ddp_bb: bool = option(False, 'do not broadcast BatchNorm buffers in DDP')
    dist_bn: str = option('reduce', "BatchNorm statistics across processes after each epoch: reduce, broadcast or '' "
                          '(none)', choices=('', 'reduce', 'broadcast'))
    synchronize_step: bool = option(False, 'synchronise the device after every step (for timing)')
