""" Run by tests/edropout/test_edropout_runs.py under `accelerate launch` with two CPU processes (gloo): trains
with ``--edropout`` and saves each rank's applied state and energy search for the test to compare."""
import os
import sys

import torch
from accelerate import Accelerator

from dropcluster_timm.edropout.layers import edropout_state
from dropcluster_timm.train import parse_train_args, train

dump = sys.argv[1]
acc = Accelerator()  # ours, so that process_index is still known after train()
run = train(parse_train_args(sys.argv[2:]))
torch.save({
    'rank': acc.process_index,
    'world_size': acc.num_processes,
    'state': edropout_state(run.model),
    'search': run.hooks[0].search.state_dict(),
}, os.path.join(dump, f'rank{acc.process_index}.pt'))
acc.end_training()
