""" Training settings: the typed configuration of a run, and its one set of defaults.

``TrainConfig()`` holds timm's defaults (an ImageFolder or timm data set named by ``data``);
``embedded_config()`` is the small run on the embedded digits, the same config with
``EMBEDDED_DEFAULTS`` laid over it. The ``train`` command line builds exactly these: no arguments is
``embedded_config()``, ``--data-dir D`` is ``TrainConfig`` with ``data.data_dir = D``.
``TrainConfig.check`` gives one-line errors for settings that cannot work.

    cfg = TrainConfig()
    cfg.data.data_dir, cfg.optim.epochs = '/data/mydata', 100
    train(cfg)
"""
import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional

from ..data import EMBEDDED_DATASET
from ..errors import InputError
from ..layers.options import LAYER_OPTIONS, layer_options_error
from .options import iter_options
from .layout import DEFAULT_OUTPUT
from .resume import run_folder_of
from .sections import DataConfig, DropClusterConfig, EDropoutConfig, LossConfig, ModelConfig, OptimConfig, OutputConfig

__all__ = ['DataConfig', 'ModelConfig', 'DropClusterConfig', 'EDropoutConfig', 'OptimConfig', 'LossConfig', 'OutputConfig',
           'TrainConfig', 'EMBEDDED_DEFAULTS', 'DROPCLUSTER_MODEL_DEFAULTS', 'embedded_config', 'uses_embedded_data']

# The embedded digits run: 1,797 8x8 images, so a small model, short and without ImageNet's
# augmentation. Settings by config path.
EMBEDDED_DEFAULTS: Dict[str, Any] = {
    'data.dataset': EMBEDDED_DATASET, 'model.name': 'resnet18_dropcluster', 'data.img_size': 32,
    'optim.batch_size': 64, 'optim.epochs': 12, 'optim.opt': 'adamw', 'optim.lr': 2e-3, 'optim.weight_decay': 0.05,
    'optim.warmup_epochs': 1, 'optim.sched_on_updates': True, 'data.hflip': 0.0, 'data.scale': (0.75, 1.0),
    'data.workers': 0, 'data.color_jitter': None, 'data.train_interpolation': '', 'loss.smoothing': 0.0,
    'output.checkpoint_hist': 2,
    # DropCluster switches on after a quarter of the run, so a short run of any length sees it.
    'dropcluster.epoch_fractions': (0.25, 0.25, 0.25),
    # At 32 px stages 3-4 are 2x2 and 1x1: put DropCluster in the stem (16x16) too, ~16-pixel clusters.
    'model.layer_options': {'cluster_size': 16}, 'model.kwargs': {'dc_stem': True},
}
# The settings above that are arguments of a *_dropcluster model, not given to other models.
DROPCLUSTER_MODEL_DEFAULTS = ('model.layer_options', 'model.kwargs')


def uses_embedded_data(dataset: str, data_dir: Optional[str]) -> bool:
    """Whether a run with this ``--dataset`` / ``--data-dir`` trains on the embedded digits."""
    return not data_dir and dataset in ('', EMBEDDED_DATASET)


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dropcluster: DropClusterConfig = field(default_factory=DropClusterConfig)
    edropout: EDropoutConfig = field(default_factory=EDropoutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def get(self, path: str) -> Any:
        """The setting at ``path`` (``'optim.epochs'``)."""
        section, name = path.split('.')
        return getattr(getattr(self, section), name)

    def set(self, path: str, value: Any) -> None:
        section, name = path.split('.')
        setattr(getattr(self, section), name, value)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready copy, as ``run.json`` records it."""
        return asdict(self)

    def to_args(self) -> Dict[str, Any]:
        """The settings as ``train`` arguments (``args.yaml``; ``-c args.yaml`` gives the same config)."""
        args = {opt.dest: opt.to_flag(self.get(opt.path)) for opt in iter_options(self) if opt.flag}
        layer_flags = {o.name: o.dest for o in LAYER_OPTIONS if o.flag}
        for name, value in self.model.layer_options.items():
            if name in layer_flags:
                args[layer_flags[name]] = value
            else:  # a layer option without a flag: a model argument
                args['model_kwargs'] = dict(args['model_kwargs'], **{f'dc_{name}': value})
        args['device'] = 'cpu' if self.output.cpu else 'cuda'
        return args

    def resolved(self) -> 'TrainConfig':
        """A copy with the settings left to the run filled in: the DropCluster ramp's start, warm-up and
        re-clustering interval (shares of the epochs), and the run folder (the resumed run's with
        ``resume``, else ``output/train``); ``train`` runs and records this."""
        cfg = copy.deepcopy(self)
        cfg.dropcluster = self.dropcluster.resolved(self.optim.epochs)
        if cfg.output.output is None:
            cfg.output.output = run_folder_of(cfg.output.resume) if cfg.output.resume else DEFAULT_OUTPUT
        return cfg

    def check(self) -> None:
        """One-line errors (``InputError``) for settings that cannot work, before any setup."""
        for opt in iter_options(self):
            error = opt.error(self.get(opt.path))
            if error:
                raise InputError(error)
        d, m, dc, o, out, ed = self.data, self.model, self.dropcluster, self.optim, self.output, self.edropout
        if not d.dataset and not d.data_dir:
            raise InputError('no data set: give --data-dir (data.data_dir, an ImageFolder root) or --dataset '
                                '(data.dataset); embedded_config() trains on the embedded digits')
        error = layer_options_error(m.layer_options, label=lambda option: option.flag or option.model_arg)
        if error:  # the checks declared with the layer options (layers/options.py), as the layer runs them
            raise InputError(error)
        unknown = sorted(set(m.layer_options) - {o.name for o in LAYER_OPTIONS})
        if unknown:
            raise InputError(f'model.layer_options: no DropCluster layer option {", ".join(unknown)}')
        if ed.batch_per_state is not None and ed.batch_per_state > o.batch_size:
            raise InputError(f'--edropout-batch {ed.batch_per_state} exceeds --batch-size {o.batch_size}')
        if dc.shape == 'multistep' and not dc.milestones:
            raise InputError('--drop-cluster-shape multistep needs --drop-cluster-milestones')
        if out.overwrite and out.resume:
            raise InputError('--overwrite replaces the results in --output and --resume continues them: give one')


def embedded_config(model: Optional[str] = None) -> TrainConfig:
    """The run on the embedded digits (``dropcluster-timm train`` without data): ``TrainConfig`` with
    ``EMBEDDED_DEFAULTS``; with ``model``, that model, which gets the DropCluster model arguments only
    if it is a ``*_dropcluster`` model."""
    cfg = TrainConfig()
    for path, value in EMBEDDED_DEFAULTS.items():
        cfg.set(path, copy.deepcopy(value))
    if model is not None:
        cfg.model.name = model
        if 'dropcluster' not in model:
            for path in DROPCLUSTER_MODEL_DEFAULTS:
                cfg.set(path, copy.deepcopy(TrainConfig().get(path)))
    return cfg
