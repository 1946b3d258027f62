""" Training with Accelerate: typed settings (``config``), the run's parts (``builders``), one epoch
(``loop``), the run folder (``run_folder``) and the whole run (``trainer.train``).

    from dropcluster_timm.train import parse_train_args, train
    train(parse_train_args(['--data-dir', '/data/mydata', '--model', 'resnet50_dropcluster']))
"""
from .builders import build_loss, build_model, make_schedule, recluster, schedule_warnings, use_cpu_cores
from .config import (
    DataConfig, DropClusterConfig, ModelConfig, OptimConfig, OutputConfig, TrainConfig, add_train_arguments,
    config_from_args, parse_train_args)
from .loop import TrainState, train_one_epoch
from .trainer import train

__all__ = [
    'TrainConfig', 'DataConfig', 'ModelConfig', 'DropClusterConfig', 'OptimConfig', 'OutputConfig',
    'add_train_arguments', 'config_from_args', 'parse_train_args',
    'build_model', 'build_loss', 'make_schedule', 'schedule_warnings', 'recluster', 'use_cpu_cores',
    'TrainState', 'train_one_epoch', 'train',
]
