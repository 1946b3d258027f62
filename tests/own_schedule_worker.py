""" A training loop that never mentions DropCluster, as a timm user writes one, run by
tests/layers/test_own_schedule.py with two CPU processes (gloo) under `accelerate launch`.

    own_schedule_worker.py OUT ddp|ddp_no_bb|ddp_compiled|accelerate

The model is built as timm's train.py builds it (``ddp_compiled``: DDP without the buffer broadcast,
then torch.compile, as timm's train.py with --no-ddp-bb --torchcompile); every rank trains on its own random data, so the
maps are identical afterwards only if the layers make them so. Each rank saves its cluster state.
"""
import os
import sys

import torch
import torch.nn.functional as F

import timm
import dropcluster_timm  # noqa: F401  registers the *_dropcluster models

out, mode = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = timm.create_model('resnet18_dropcluster', num_classes=4, drop_block_rate=0.2, drop_path_rate=0.05,
                          dc_recluster_every=4, dc_ramp_steps=6, dc_cluster_images=4, dc_num_clusters=4)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
if mode == 'accelerate':
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    rank = accelerator.process_index
else:
    torch.distributed.init_process_group('gloo')
    rank = torch.distributed.get_rank()
    model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=mode == 'ddp')
    if mode == 'ddp_compiled':
        model = torch.compile(model, backend='eager')
data = torch.Generator().manual_seed(100 + rank)  # each rank its own images
model.train()
for step in range(10):
    x = torch.randn(4, 3, 96, 96, generator=data) * (1 + rank)
    y = torch.randint(0, 4, (4,), generator=data)
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
if mode == 'ddp_compiled':  # compiled, not left eager: the variant that clusters and the one that does not
    from torch._dynamo.utils import counters
    assert 2 <= counters['stats']['unique_graphs'] <= 4, dict(counters['stats'])
state = {k: v.clone() for k, v in model.state_dict().items() if k.rsplit('.', 1)[-1] in ('cluster_map', 'cluster_counts',
                                                                                        'num_steps')}
torch.save(state, os.path.join(out, f'rank{rank}.pt'))
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
