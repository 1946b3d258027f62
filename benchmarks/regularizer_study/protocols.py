""" The study's protocols: one dict each, fixed before its first run (a row names its protocol in
``config``; changing an entry after rows exist would make those rows lie).

``cpu`` is the v3 study. The ``v4_*`` entries are the candidate regimes of v4, registered before any of
their runs: each is meant to make the unregularised network fit its training images (clean train top-1
>= 99%), so that a known regulariser (Cutout, the positive control) can help. The gate (``gate.py``)
runs ``none`` and ``cutout`` in each and picks the cheapest one where Cutout beats none by at least a
point; the five-arm study then runs there. No v4 candidate passed. The ``v5_*`` entries dose Cutout as
its paper does on CIFAR-10 (a 16 px square) in regimes without the random crop, where the network
memorises its images and the Cutout paper reports its gains.

Cost per run, one thread of the AVX2 development machine (AMD EPYC), measured by timing 12 training
steps of 100 images after 3 warm-up steps (``none`` arm): widths 16-32-64-128 0.21-0.24 s a step,
24-48-96-192 0.41 s, 32-64-128-256 0.66-0.75 s; two basic blocks per stage at 16-32-64-128 0.43 s.
The estimates below add the evaluation (10,000 test images and 40,000 corrupted ones, forward only).
"""
from typing import Any, Dict

__all__ = ['CPU', 'GPU', 'TINY', 'V4_CANDIDATES', 'V5_CANDIDATES', 'SECOND_RATE', 'SECOND_RATE_ARMS', 'second_rate',
           'CANDIDATES', 'CONFIGS']

# Fixed before any run. The CPU network is narrower than the 32-64-128 first planned: at those widths a
# run took 11 minutes of training on one core (0.73 s a step), at 16-32-64-128 0.25 s (see the note
# of the commit that fixed it). timm's ResNet has four stages; the drop slots are the stem and stages 1-2.
CPU = dict(
    name='cpu', layers=[1, 1, 1, 1], channels=[16, 32, 64, 128], drop_stages=[1, 2], block_size=4, img_size=32,
    train_images=2000, epochs=60, batch_size=100, lr=0.1, weight_decay=5e-4, momentum=0.9, lr_warmup_epochs=3,
    drop_rate=0.1, drop_start=12, drop_warmup=30, recluster_every=12, cluster_images=256, cutout_size=8,
    test_images=10000, corruption_images=1000, seeds=list(range(24)), amp=None, channels_last=False,
    augment='crop_flip',  # data.AUGMENTATIONS: the standard CIFAR crop and flip
)
# The same protocol on a GPU: a half-width ResNet-18, 5,000 images per seed, bf16, channels-last.
GPU = dict(CPU, name='gpu', layers=[2, 2, 2, 2], channels=[32, 64, 128, 256], train_images=5000, batch_size=128,
           amp='bfloat16', channels_last=True)
# The whole pipeline in seconds (tests, dry runs); its numbers mean nothing.
TINY = dict(CPU, name='tiny', channels=[8, 16, 32, 64], train_images=100, epochs=3, batch_size=50, drop_start=1,
            drop_warmup=1, recluster_every=1, cluster_images=16, test_images=100, corruption_images=20, seeds=[0, 1])


def _v4(name: str, epochs: int, est_minutes: float, **changes: Any) -> Dict[str, Any]:
    """A v4 candidate: the v3 protocol on 1,000 images, with the DropCluster schedule scaled to its
    length as in v3 (start at 1/5 of training, ramp over 1/2, re-cluster every 1/5)."""
    return dict(CPU, name=name, train_images=1000, epochs=epochs, drop_start=epochs // 5, drop_warmup=epochs // 2,
                recluster_every=epochs // 5, est_minutes=est_minutes, **changes)


# v4 candidates, registered 2026-12-06 before any of their runs, cheapest first (the gate's order).
# What drives overfitting differs: depth, width, and training length at the v3 width.
V4_CANDIDATES = (
    # The v3 network trained far longer: 250 epochs, 4 px Cutout: 2,500 steps x 0.24 s + 0.8 min.
    _v4('v4_long1k_c4', 250, 10.8, cutout_size=4),
    # 1.5x the v3 width, 150 epochs, a 4 px Cutout (an 8 px square covers 6% of a 32 px image, 16 px a quarter).
    _v4('v4_mid1k_c4', 150, 11.6, channels=[24, 48, 96, 192], cutout_size=4),
    # Twice the v3 depth (two basic blocks per stage), 150 epochs: 1,500 steps x 0.43 s + 1.5 min.
    _v4('v4_deep1k', 150, 12.3, layers=[2, 2, 2, 2]),
    # Twice the v3 width, 90 epochs: 900 steps x 0.70 s + 2 min.
    _v4('v4_wide1k', 90, 12.5, channels=[32, 64, 128, 256]),
)

# v5 candidates, registered 2026-12-07 before any of their runs, cheapest first: the v3 network, recipe,
# DropCluster schedule, 2,000 images and 60 epochs, with the Cutout paper's CIFAR-10 square (16 px) and
# without the random crop in every arm. Cost as v3: 1,200 steps x 0.24 s + 0.8 min (AVX2, one thread).
V5_CANDIDATES = (
    dict(CPU, name='v5_flip2k', augment='flip', cutout_size=16, est_minutes=5.6),    # horizontal flip only
    dict(CPU, name='v5_noaug2k', augment='none', cutout_size=16, est_minutes=5.6),   # the same images every epoch
)
SECOND_RATE = 0.2  # the five-arm study's second rate for DropBlock and DropCluster, fixed before its runs
SECOND_RATE_ARMS = ('dropblock', 'dropcluster')  # the arms run at it


def second_rate(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """``cfg`` with DropBlock and DropCluster at ``SECOND_RATE`` (its rows pair with ``cfg``'s by seed)."""
    return dict(cfg, name=f"{cfg['name']}_rate{SECOND_RATE:g}", drop_rate=SECOND_RATE)


# The gate's candidate lists, by study; 'tiny' runs the gate and the study after it in seconds (tests).
CANDIDATES = {'v4': V4_CANDIDATES, 'v5': V5_CANDIDATES, 'tiny': (dict(TINY, est_minutes=0.1),)}
CONFIGS: Dict[str, Dict[str, Any]] = {c['name']: c for c in (CPU, GPU, TINY) + V4_CANDIDATES + V5_CANDIDATES
                                      + tuple(second_rate(c) for c in V5_CANDIDATES + (TINY,))}
