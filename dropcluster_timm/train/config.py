""" Training settings: the typed configuration of a run.

Field names follow timm's ``train.py`` arguments, so timm's own helpers read the settings directly
(``timm.optim.optimizer_kwargs(cfg.optim)``, ``timm.scheduler.scheduler_kwargs(cfg.optim)``).
``dropcluster_timm.train.args`` builds a ``TrainConfig`` from the command line; nothing else reads
the command line. ``TrainConfig.check`` gives one-line errors for settings that cannot work.
"""
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ..data import EMBEDDED_DATASET
from ..errors import TrainingError
from ..layers.options import LAYER_OPTIONS

__all__ = ['DataConfig', 'ModelConfig', 'DropClusterConfig', 'EDropoutConfig', 'OptimConfig', 'LossConfig', 'OutputConfig',
           'TrainConfig']


@dataclass
class DataConfig:
    """The data set, its splits, the loaders and the input pipeline (timm's data arguments)."""
    dataset: str = EMBEDDED_DATASET  # '' = ImageFolder, a timm data set name, or the embedded digits
    data_dir: Optional[str] = None
    train_split: str = 'train'
    val_split: str = 'validation'
    num_classes: Optional[int] = None  # checked against the data set
    class_map: str = ''
    train_num_samples: Optional[int] = None
    val_num_samples: Optional[int] = None
    dataset_download: bool = False
    input_img_mode: Optional[str] = None
    input_key: Optional[str] = None
    target_key: Optional[str] = None
    dataset_trust_remote_code: bool = False
    epoch_repeats: float = 0.0
    workers: int = 4
    pin_mem: bool = False
    aug_repeats: float = 0.0
    # timm's resolve_data_config settings (None: the model's own)
    img_size: Optional[int] = None
    in_chans: Optional[int] = None
    input_size: Optional[Tuple[int, int, int]] = None
    crop_pct: Optional[float] = None
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    interpolation: str = ''
    # timm's create_transform settings of the training images
    no_aug: bool = False
    train_crop_mode: Optional[str] = None
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: Optional[float] = 0.4
    color_jitter_prob: Optional[float] = None
    grayscale_prob: Optional[float] = None
    gaussian_blur_prob: Optional[float] = None
    auto_augment: Optional[str] = None
    re_prob: float = 0.0
    re_mode: str = 'pixel'
    re_count: int = 1
    train_interpolation: str = 'random'

    def dataset_args(self) -> Dict[str, Any]:
        """The ``timm.data.create_dataset`` settings besides name, root and split."""
        args = dict(download=self.dataset_download, repeats=self.epoch_repeats,
                    trust_remote_code=self.dataset_trust_remote_code)
        for key, name in (('class_map', 'class_map'), ('input_img_mode', 'input_img_mode'),
                          ('input_key', 'input_key'), ('target_key', 'target_key')):
            if getattr(self, key):
                args[name] = getattr(self, key)
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
    name: str = 'resnet18_dropcluster'
    pretrained: bool = False
    pretrained_path: Optional[str] = None
    initial_checkpoint: str = ''
    drop_rate: Optional[float] = None
    drop_path_rate: Optional[float] = None
    drop_block_rate: Optional[float] = None
    bn_momentum: Optional[float] = None
    bn_eps: Optional[float] = None
    global_pool: Optional[str] = None
    # DropCluster layer options set for this run ({name: value}, names of layers.options.LAYER_OPTIONS);
    # the others keep the model's defaults
    layer_options: Dict[str, Any] = field(default_factory=dict)
    kwargs: Dict[str, Any] = field(default_factory=dict)
    head_init_scale: Optional[float] = None
    head_init_bias: Optional[float] = None
    grad_checkpointing: bool = False
    channels_last: bool = False
    fast_norm: bool = False
    sync_bn: bool = False
    torchcompile: Optional[str] = None  # a torch.compile backend, through Accelerate's dynamo plugin
    torchcompile_mode: Optional[str] = None


@dataclass
class DropClusterConfig:
    """The drop-rate ramp and the periodic re-clustering (``DropClusterSchedule``); with a plain timm
    model and ``--drop-block``, the same ramp drives its DropBlock layers."""
    rate: float = 0.1
    start_epoch: float = 0.0
    warmup_epochs: float = 0.0
    shape: str = 'linear'
    gamma: float = 0.5  # factor of the 'exponential' and 'multistep' shapes
    milestones: List[float] = field(default_factory=list)  # epochs where 'multistep' rises
    update_freq: int = 1
    update_batches: int = 2  # batches of training images the clusters are computed from
    soft_reset_interval: int = 0  # BRB soft reset every N epochs (0: never), re-clustering right after
    soft_reset_factor: float = 0.9  # share of the weights kept
    soft_reset_scope: List[str] = field(default_factory=list)  # parameter name prefixes (empty: all)


@dataclass
class EDropoutConfig:
    """EDropout (``dropcluster_timm.edropout.layers``): energy-based channel states in the blocks' drop_block
    slots, evolved during training; the published model is the pruned one. Defaults: the paper's."""
    enabled: bool = False
    candidates: int = 8  # population size
    interval: int = 2  # evolve every N training batches
    converge_steps: int = 100  # stop evolving once the best state is unchanged this many evolution steps
    keep_prob: float = 0.5  # initial probability of a channel being on
    batch_per_state: Optional[int] = None  # images each state is scored on (None: see images_per_state)
    stages: List[int] = field(default_factory=lambda: [1, 2, 3, 4])
    unit: str = 'channel'  # 'cluster': the clusters of the model's DropCluster maps (no pruning)

    def images_per_state(self, batch_size: int) -> int:
        """``batch_per_state``, by default ``batch_size / (2 * candidates)``: the scoring forward of the
        2 x candidates states then holds one batch of images, about 0.3 of a training step (docs/benchmarks.md)."""
        return self.batch_per_state or max(1, batch_size // (2 * self.candidates))


@dataclass
class OptimConfig:
    """Optimizer, learning rate and its schedule, precision, EMA and the seed (timm's names)."""
    epochs: int = 300
    start_epoch: Optional[int] = None
    batch_size: int = 128  # per process
    validation_batch_size: Optional[int] = None
    grad_accum_steps: int = 1
    opt: str = 'sgd'
    lr: Optional[float] = None  # None: lr_base scaled by the global batch size
    lr_base: float = 0.1
    lr_base_size: int = 256
    lr_base_scale: str = ''
    momentum: float = 0.9
    weight_decay: float = 2e-5
    opt_eps: Optional[float] = None
    opt_betas: Optional[List[float]] = None
    layer_decay: Optional[float] = None
    layer_decay_min_scale: float = 0.0
    layer_decay_no_opt_scale: Optional[float] = None
    opt_kwargs: Dict[str, Any] = field(default_factory=dict)
    clip_grad: Optional[float] = None
    clip_mode: str = 'norm'
    sched: str = 'cosine'
    sched_on_updates: bool = False
    warmup_epochs: int = 5
    warmup_lr: float = 1e-5
    warmup_prefix: bool = False
    min_lr: float = 0.0
    cooldown_epochs: int = 0
    patience_epochs: int = 10
    decay_epochs: float = 90
    decay_milestones: List[int] = field(default_factory=lambda: [90, 180, 270])
    decay_rate: float = 0.1
    lr_noise: Optional[List[float]] = None
    lr_noise_pct: float = 0.67
    lr_noise_std: float = 1.0
    lr_cycle_mul: float = 1.0
    lr_cycle_decay: float = 0.5
    lr_cycle_limit: int = 1
    lr_k_decay: float = 1.0
    eval_metric: str = 'top1'
    amp: bool = False
    amp_dtype: str = 'float16'
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    model_ema_warmup: bool = False
    model_ema_force_cpu: bool = False
    seed: int = 42

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
    smoothing: float = 0.1
    bce_loss: bool = False
    bce_sum: bool = False
    bce_target_thresh: Optional[float] = None
    bce_pos_weight: Optional[float] = None
    mixup: float = 0.0
    cutmix: float = 0.0
    cutmix_minmax: Optional[List[float]] = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = 'batch'
    mixup_off_epoch: int = 0


@dataclass
class OutputConfig:
    """The run folder, checkpoints, logging, publishing and how processes cooperate."""
    output: str = 'output/train'
    resume: Optional[str] = None
    no_resume_opt: bool = False
    overwrite: bool = False  # replace the results of an earlier run in the output folder
    checkpoint_steps: int = 0  # timm's --recovery-interval
    checkpoint_hist: int = 10
    log_with: Optional[str] = None
    wandb_project: Optional[str] = None
    wandb_tags: List[str] = field(default_factory=list)
    log_interval: int = 50
    val_interval: int = 1
    push_to_hub: Optional[str] = None
    progress: bool = True
    cpu: bool = False
    no_ddp_bb: bool = False
    dist_bn: str = 'reduce'
    synchronize_step: bool = False
    train_batches_per_epoch: Optional[int] = None
    args_yaml: str = ''  # the command line's arguments, written to OUTPUT/args.yaml as timm does


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dropcluster: DropClusterConfig = field(default_factory=DropClusterConfig)
    edropout: EDropoutConfig = field(default_factory=EDropoutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready copy, as ``run.json`` records it."""
        record = asdict(self)
        record['output'].pop('args_yaml')  # args.yaml holds it
        return record

    def check(self) -> None:
        """One-line errors (``TrainingError``) for settings that cannot work, before any setup."""
        d, m, dc, o, loss, out = self.data, self.model, self.dropcluster, self.optim, self.loss, self.output
        ed = self.edropout

        def fail(flag, value, expected):
            raise TrainingError(f'{flag} must be {expected}, got {value:g}')

        for flag, value in (('--drop-cluster', dc.rate), ('--drop-block', m.drop_block_rate), ('--drop', m.drop_rate),
                            ('--drop-path', m.drop_path_rate), ('--smoothing', loss.smoothing),
                            ('--reprob', d.re_prob)):
            if value is not None and not 0.0 <= value < 1.0:
                fail(flag, value, 'in [0, 1)')
        for flag, value in (('--epochs', o.epochs), ('--batch-size', o.batch_size),
                            ('--validation-batch-size', o.validation_batch_size),
                            ('--grad-accum-steps', o.grad_accum_steps),
                            ('--drop-cluster-update-batches', dc.update_batches), ('--img-size', d.img_size),
                            ('--log-interval', out.log_interval), ('--val-interval', out.val_interval),
                            ('--train-batches-per-epoch', out.train_batches_per_epoch),
                            ('--edropout-interval', ed.interval), ('--edropout-batch', ed.batch_per_state)):
            if value is not None and value < 1:
                fail(flag, value, '>= 1')
        for option in LAYER_OPTIONS:  # the sizes and counts of the layer options
            value = m.layer_options.get(option.name)
            if option.type is int and value is not None and value < 1:
                fail(option.flag or option.model_arg, value, '>= 1')
        for flag, value in (('--drop-cluster-start', dc.start_epoch), ('--drop-cluster-warmup', dc.warmup_epochs),
                            ('--drop-cluster-update-freq', dc.update_freq), ('--warmup-epochs', o.warmup_epochs),
                            ('--workers', d.workers), ('--recovery-interval', out.checkpoint_steps),
                            ('--checkpoint-hist', out.checkpoint_hist), ('--mixup', loss.mixup),
                            ('--cutmix', loss.cutmix), ('--min-lr', o.min_lr), ('--aug-repeats', d.aug_repeats),
                            ('--start-epoch', o.start_epoch), ('--soft-reset-interval', dc.soft_reset_interval)):
            if value is not None and value < 0:
                fail(flag, value, '>= 0')
        if ed.enabled:
            if ed.candidates < 4:
                fail('--edropout-candidates', ed.candidates, '>= 4 (the evolution mixes three other states)')
            if not 0.0 < ed.keep_prob <= 1.0:
                fail('--edropout-keep-prob', ed.keep_prob, 'in (0, 1]')
            if ed.converge_steps < 0:
                fail('--edropout-converge', ed.converge_steps, '>= 0')
            if ed.batch_per_state is not None and ed.batch_per_state > o.batch_size:
                raise TrainingError(f'--edropout-batch {ed.batch_per_state} exceeds --batch-size {o.batch_size}')
            if ed.unit not in ('channel', 'cluster'):
                raise TrainingError(f"--edropout-unit must be 'channel' or 'cluster', got {ed.unit!r}")
            if not ed.stages or any(s not in (1, 2, 3, 4) for s in ed.stages):
                raise TrainingError(f'--edropout-stages must be stage numbers in 1..4, got {ed.stages}')
        if not 0.0 < dc.gamma <= 1.0:
            fail('--drop-cluster-gamma', dc.gamma, 'in (0, 1]')
        if dc.shape == 'multistep' and not dc.milestones:
            raise TrainingError('--drop-cluster-shape multistep needs --drop-cluster-milestones')
        low, high = m.layer_options.get('min_cluster_size'), m.layer_options.get('max_cluster_size')
        if low and high and low > high:
            raise TrainingError(f'--min-cluster-size {low} exceeds --max-cluster-size {high}')
        if not 0.0 <= dc.soft_reset_factor < 1.0:
            fail('--soft-reset-factor', dc.soft_reset_factor, 'in [0, 1)')
        if out.overwrite and out.resume:
            raise TrainingError('--overwrite replaces the results in --output and --resume continues them: give one')
        if o.lr is not None and not o.lr > 0:
            fail('--lr', o.lr, '> 0')
        if not o.lr_base > 0:
            fail('--lr-base', o.lr_base, '> 0')
        if o.model_ema and not 0.0 < o.model_ema_decay < 1.0:
            fail('--model-ema-decay', o.model_ema_decay, 'in (0, 1)')
        choices = (('--clip-mode', o.clip_mode, ('norm', 'value', 'agc')),
                   ('--amp-dtype', o.amp_dtype, ('float16', 'bfloat16')),
                   ('--lr-base-scale', o.lr_base_scale, ('', 'linear', 'sqrt')),
                   ('--dist-bn', out.dist_bn, ('', 'reduce', 'broadcast')),
                   ('--eval-metric', o.eval_metric, ('top1', 'top5', 'eval_loss', 'loss')))
        for flag, value, allowed in choices:
            if value not in allowed:
                raise TrainingError(f'{flag} must be one of {", ".join(repr(a) for a in allowed)}, got {value!r}')
