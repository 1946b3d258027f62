""" Deprecated: ``dropcluster_timm.training`` was split by concern; this alias goes in the next release.

Old name -> new home: data sets in ``dropcluster_timm.data``, evaluation in ``dropcluster_timm.evaluate``,
the error type in ``dropcluster_timm.errors``, model helpers in ``dropcluster_timm.model_helpers``,
training in the ``dropcluster_timm.train`` package (typed ``TrainConfig`` instead of an argparse
namespace). ``python -m dropcluster_timm.training CHECKPOINT ...`` is ``dropcluster-timm evaluate``.
"""
import importlib
import sys
import warnings

_MOVED = {
    'TrainingError': 'errors', 'DigitsDataset': 'data', 'DataBundle': 'data', 'EMBEDDED_DATASET': 'data',
    'TRAIN_SPLITS': 'data', 'EVAL_SPLITS': 'data', 'find_split_folder': 'data', 'dataset_description': 'data',
    'build_data': 'data', 'set_transforms': 'data', 'cluster_batch': 'data', 'split_name': 'data',
    'is_folder_dataset': 'data',
    'evaluate': 'evaluate', 'evaluate_checkpoint': 'evaluate', 'format_corruption_report': 'evaluate',
    'init_cluster_maps': 'model_helpers', 'cluster_state': 'model_helpers',
    'TrainState': 'train.loop', 'train_one_epoch': 'train.loop',
    'build_model': 'train.builders', 'make_schedule': 'train.recipe', 'schedule_warnings': 'train.recipe',
    'recluster': 'train.builders', 'use_cpu_cores': 'train.builders',
    'save_checkpoint': 'train.run_folder', 'find_checkpoint': 'train.run_folder',
    'check_checkpoint_files': 'train.run_folder', 'load_checkpoint': 'train.run_folder',
    'check_resume': 'train.run_folder', 'check_output': 'train.run_folder', 'write_run_file': 'train.run_folder',
    'MetricsLog': 'train.run_folder', 'run_card_metrics': 'train.run_folder', 'list_checkpoints': 'train.run_folder',
}
_REPLACED = {
    'check_args': 'TrainConfig.check()',
    'configure_dropcluster': 'the cluster settings of ModelConfig (build_model passes them to the model)',
    'save_model_folder': 'dropcluster_timm.hub.save_pretrained (it writes each file atomically)',
    'push_folder': 'dropcluster_timm.hub.push',
    'check_push_credentials': 'dropcluster_timm.hub.resolve_push_token',
    'eval_main': "dropcluster_timm.cli.main(['evaluate', ...])",
}


def __getattr__(name):
    if name in _MOVED:
        home = f'dropcluster_timm.{_MOVED[name]}'
        warnings.warn(f'dropcluster_timm.training.{name} is deprecated: use {home}.{name}', DeprecationWarning,
                      stacklevel=2)
        return getattr(importlib.import_module(home), name)
    if name in _REPLACED:
        raise AttributeError(f'dropcluster_timm.training.{name} was removed: use {_REPLACED[name]}')
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


if __name__ == '__main__':  # pragma: no cover
    print('python -m dropcluster_timm.training is deprecated: use `dropcluster-timm evaluate`', file=sys.stderr)
    from .cli import main
    sys.exit(main(['evaluate'] + sys.argv[1:]))
