""" Training with Accelerate: typed settings (``config``), the command line that builds them (``args``),
the run's parts (``builders``), the DropCluster
recipe (``recipe``), the hooks of optional methods (``hooks``), one epoch (``loop``), the run folder (``run_folder``) and the whole run
(``trainer.train``).

    from . import parse_train_args, train
    train(parse_train_args(['--data-dir', '/data/mydata', '--model', 'resnet50_dropcluster']))
"""
from .args import add_train_arguments, config_from_args, parse_train_args, parse_with_config_file
from .builders import (
    build_accelerator, build_ema, build_loaders, build_loss, build_model, build_optimizer, build_scheduler,
    recluster, use_cpu_cores)
from .config import DataConfig, DropClusterConfig, LossConfig, ModelConfig, OptimConfig, OutputConfig, TrainConfig
from .hooks import TrainHook, build_hooks
from .recipe import DropClusterRecipe, make_schedule, schedule_warnings
from .loop import TrainState, train_one_epoch
from .resume import NothingToTrain
from .trainer import train

__all__ = [
    'TrainConfig', 'DataConfig', 'ModelConfig', 'DropClusterConfig', 'OptimConfig', 'LossConfig', 'OutputConfig',
    'add_train_arguments', 'config_from_args', 'parse_train_args', 'parse_with_config_file',
    'build_accelerator', 'build_loaders', 'build_model', 'build_optimizer', 'build_scheduler', 'build_ema',
    'build_loss', 'recluster', 'use_cpu_cores',
    'DropClusterRecipe', 'make_schedule', 'schedule_warnings', 'TrainHook', 'build_hooks',
    'TrainState', 'train_one_epoch', 'train', 'NothingToTrain',
]
