#!/usr/bin/env python3
""" Train timm models with DropCluster, on one or many GPUs / machines or on the CPU, with Accelerate.

    accelerate launch train_timm.py                      # embedded default: resnet18_dropcluster on digits
    accelerate launch train_timm.py --data-dir /data/imagenet --model resnet50_dropcluster \\
        --drop-cluster 0.1 --drop-cluster-start 20 --drop-cluster-warmup 10 --output runs/r50
    dropcluster-timm evaluate runs/r50/best --corruptions all   # clean and corrupted top-1 of a saved model

The same as ``dropcluster-timm train``. The options are declared in ``dropcluster_timm/train/sections.py``
and parsed into a ``TrainConfig`` by ``dropcluster_timm.train.args``; build, loop, save:
``dropcluster_timm.train.trainer.train``.
"""
import sys

from dropcluster_timm.cli import main

if __name__ == '__main__':
    sys.exit(main(['train'] + sys.argv[1:]))
