""" The run folder's layout: the names the writers and readers of a run share.

    OUTPUT/checkpoints/epoch_0003/   accelerator.save_state, the run's state, meta.json (the completion marker)
    OUTPUT/run.json                  settings, data read, progress, what DropCluster did
    OUTPUT/args.yaml                 the run's settings as train arguments (as timm's train.py)
    OUTPUT/metrics.json, metrics.csv one row per epoch; summary.csv as timm's train.py writes it
    OUTPUT/best/, OUTPUT/last/       model folders (hub.save_pretrained)
"""
__all__ = ['CHECKPOINT_DIR', 'META_FILE', 'RUN_FILE', 'ARGS_FILE', 'LOCK_FILE', 'DEFAULT_OUTPUT', 'RESULTS', 'RECORDS']

CHECKPOINT_DIR = 'checkpoints'
META_FILE = 'meta.json'  # a checkpoint's completion marker
RUN_FILE = 'run.json'
ARGS_FILE = 'args.yaml'
LOCK_FILE = '.lock'
DEFAULT_OUTPUT = 'output/train'  # a new run's folder when none is given, as timm's train.py
# What a run leaves in its folder once it has trained: a new run there without --resume would replace
# it. A run stopped in its first epoch leaves only its records, which a new run rewrites.
RESULTS = (CHECKPOINT_DIR, 'best', 'last', 'metrics.json', 'metrics.csv', 'summary.csv')
RECORDS = (RUN_FILE, ARGS_FILE)
