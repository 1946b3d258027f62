""" One random stream per purpose, each seeded from (seed, purpose).

Two arms of one seed must see the same training subset, batches, augmentations and initial weights
from the first step to the last; what one arm draws for itself (its cluster partitions, its drop
masks, Cutout's boxes) must not shift the draws of the others. So no two purposes share a generator.
"""
from typing import Union

import numpy as np
import torch

__all__ = ['PURPOSES', 'purpose_seed', 'stream']

# Append only: a purpose's number is part of every stored row's random draws.
PURPOSES = ('subset', 'order', 'augment', 'cutout', 'recluster_images', 'partitions', 'init', 'masks',
            'dropped_fraction')


def purpose_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for ``purpose`` of run ``seed`` (numpy's SeedSequence mixes the pair)."""
    if purpose not in PURPOSES:
        raise ValueError(f'unknown random stream {purpose!r}, expected one of {PURPOSES}')
    words = np.random.SeedSequence([int(seed), PURPOSES.index(purpose)]).generate_state(2, dtype=np.uint32)
    return int(words[0]) << 31 ^ int(words[1])


def stream(seed: int, purpose: str, device: Union[str, torch.device] = 'cpu') -> torch.Generator:
    """A ``torch.Generator`` on ``device`` for ``purpose`` of run ``seed``."""
    return torch.Generator(device=device).manual_seed(purpose_seed(seed, purpose))
