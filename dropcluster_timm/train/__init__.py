""" Training with Accelerate: typed settings (``config``, its sections in ``sections``, each option
declared once as ``options`` describes), the command line generated from them (``args``), the run's
parts (``builders``), the DropCluster recipe (``recipe``), the hooks of optional methods (``hooks``),
one epoch (``loop``), the run folder (``layout``, ``run_folder``, ``records``), resuming (``resume``,
``mid_epoch``) and the whole run (``trainer.train``).

    from dropcluster_timm.train import TrainConfig, parse_train_args, train
    cfg = TrainConfig()
    cfg.data.data_dir = '/data/mydata'
    train(cfg)  # the same run as: train(parse_train_args(['--data-dir', '/data/mydata']))
"""
from .args import add_train_arguments, config_from_args, parse_train_args, parse_with_config_file
from .builders import (
    build_accelerator, build_ema, build_loaders, build_loss, build_model, build_optimizer, build_scheduler,
    recluster, use_cpu_cores)
from .config import (
    EMBEDDED_DEFAULTS, DataConfig, DropClusterConfig, EDropoutConfig, LossConfig, ModelConfig, OptimConfig, OutputConfig,
    TrainConfig, embedded_config)
from .hooks import TrainHook, build_hooks
from .recipe import DropClusterRecipe, make_schedule, schedule_warnings
from .loop import TrainState, train_one_epoch
from .resume import NothingToTrain
from .trainer import train

__all__ = [
    'TrainConfig', 'DataConfig', 'ModelConfig', 'DropClusterConfig', 'EDropoutConfig', 'OptimConfig', 'LossConfig',
    'OutputConfig', 'EMBEDDED_DEFAULTS', 'embedded_config',
    'add_train_arguments', 'config_from_args', 'parse_train_args', 'parse_with_config_file',
    'build_accelerator', 'build_loaders', 'build_model', 'build_optimizer', 'build_scheduler', 'build_ema',
    'build_loss', 'recluster', 'use_cpu_cores',
    'DropClusterRecipe', 'make_schedule', 'schedule_warnings', 'TrainHook', 'build_hooks',
    'TrainState', 'train_one_epoch', 'train', 'NothingToTrain',
]
