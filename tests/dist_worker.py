""" Run by tests/train/test_train_runs.py under `accelerate launch` with two CPU processes (gloo).

Trains with ``dropcluster_timm.train.train`` (gradient accumulation on), then re-clusters once more
from a batch that differs per rank, and saves each rank's cluster maps for the test to compare.
"""
import os
import sys

import torch
from accelerate import Accelerator

from dropcluster_timm import cluster_state, dropcluster_layers, update_clusters
from dropcluster_timm.train import parse_train_args, train

dump = sys.argv[1]
acc = Accelerator()  # ours: the process group stays up after train() for the re-clustering below
cfg = parse_train_args(sys.argv[2:])
run = train(cfg)
rank = acc.process_index
after_training = cluster_state(run.model)
gen = torch.Generator().manual_seed(1234 + rank)  # different data on each rank
x = torch.randn(8, 3, 32, 32, generator=gen) * (rank + 1)
update_clusters(run.model, x)
torch.save({
    'world_size': acc.num_processes,
    'rank': rank,
    'grad_accum': cfg.optim.grad_accum_steps,
    'after_training': after_training,
    'after_update': cluster_state(run.model),
    'counts': {name: layer.cluster_counts.clone() for name, layer in dropcluster_layers(run.model)},
    'ema': cluster_state(run.ema.module) if run.ema is not None else None,
    'step': run.state.global_step,
    'rate': run.schedule.rate,
    'reclustered': [r['reclustered'] for r in run.metrics] if rank == 0 else None,
}, os.path.join(dump, f'rank{rank}.pt'))
acc.end_training()  # ours to take down
