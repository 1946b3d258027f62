""" What a checkpoint taken inside an epoch (``--recovery-interval``) adds, so that a run resumed from
it continues bit for bit where it stopped (on the same CPU capability).

The epoch's data order comes back from the seeded sampler, and Accelerate's ``skip_first_batches``
skips the batches already done without reading them. What is left is randomness: the augmentation of
a batch draws from the same process-wide generators (Python, NumPy, torch) as the training steps, and
Accelerate's loader reads one batch ahead. So when batch ``k`` trains, batch ``k + 1`` has already
been read, from the random state of before step ``k``. Each process keeps, per checkpoint, in
``rank_state_<process>.safetensors``:

- ``batch``: the random state just before the batch read ahead (read by ``RecordedRandomness``);
- ``step``: the random state after the last step;
- the sum of its training losses over the epoch so far, and the number of batches in it.

On resume the first batch is read from ``batch`` and the next one from ``step``, as in the run that
never stopped. With ``--workers`` above 0 the augmentation draws in the loader's processes, whose random
state is not kept: the resumed epoch then sees other augmentation draws (and says so).
"""
import os
import random
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from ..errors import InputError, first_line

__all__ = ['RANK_STATE', 'rank_state_file', 'random_state', 'set_random_state', 'RecordedRandomness',
           'save_rank_state', 'load_rank_state']

RANK_STATE = r'rank_state_\d+\.safetensors'  # the file name pattern, for the checkpoint's list of files

RandomState = Dict[str, torch.Tensor]


def rank_state_file(folder: str, process_index: int) -> str:
    return os.path.join(folder, f'rank_state_{process_index}.safetensors')


def _capture() -> tuple:
    """The host's random states as the generators give them (cheap: read at every batch)."""
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def random_state(captured: Optional[tuple] = None) -> RandomState:
    """The process-wide random state of the host (Python, NumPy, torch's CPU generator) as tensors:
    now's, or one ``_capture`` read earlier."""
    (version, words, gauss), (kind, keys, pos, has_gauss, cached), torch_state = captured or _capture()
    return {
        'python': torch.tensor([version, *words], dtype=torch.int64),
        'python_gauss': torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64),  # (has one, value)
        'numpy': torch.from_numpy(keys.astype(np.int64)),
        'numpy_extra': torch.tensor([pos, has_gauss], dtype=torch.int64),
        'numpy_gauss': torch.tensor([cached], dtype=torch.float64),
        'torch': torch_state,
    }


def set_random_state(state: RandomState) -> None:
    """Restore a state from ``random_state`` (checked by ``load_rank_state``)."""
    python = state['python'].tolist()
    has_gauss, gauss = state['python_gauss'].tolist()
    random.setstate((python[0], tuple(python[1:]), gauss if has_gauss else None))
    pos, has_gauss = state['numpy_extra'].tolist()
    np.random.set_state(('MT19937', state['numpy'].numpy().astype(np.uint32), pos, has_gauss,
                         float(state['numpy_gauss'][0])))
    torch.set_rng_state(state['torch'])


class RecordedRandomness(Dataset):
    """The training set as the loader reads it: each batch read records the random state it starts
    from (``before_batch``), and after ``replay(states)`` the next batches start from those states."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.before_batch: Optional[tuple] = None  # a _capture(), made tensors only when a checkpoint saves it
        self._replay: List[RandomState] = []

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]

    def __getitems__(self, indices):  # torch's loader reads a batch through this when it exists
        if self._replay:
            set_random_state(self._replay.pop(0))
        self.before_batch = _capture()
        return [self.dataset[i] for i in indices]

    def replay(self, states: List[RandomState]) -> None:
        self._replay = list(states)


def save_rank_state(folder: str, process_index: int, before_batch: Optional[tuple], loss_sum: torch.Tensor,
                    batches: int) -> None:
    """This process's part of a mid-epoch checkpoint (every process writes its own)."""
    tensors = {f'step.{k}': v for k, v in random_state().items()}
    if before_batch is not None:  # None when the loader's worker processes read the batches
        tensors.update({f'batch.{k}': v for k, v in random_state(before_batch).items()})
    tensors['loss_sum'] = loss_sum.detach().float().cpu().reshape(1)
    tensors['batches'] = torch.tensor([batches], dtype=torch.int64)
    save_file(tensors, rank_state_file(folder, process_index))


def load_rank_state(folder: str, process_index: int) -> Optional[Tuple[List[RandomState], torch.Tensor, int]]:
    """``([batch state, step state], loss_sum, batches)`` of this process from a checkpoint, the batch
    state left out when it was not recorded; None without a file for this process (a checkpoint of
    the end of an epoch, an older checkpoint, or one written by fewer processes). A file that is not
    what ``save_rank_state`` writes is refused in one line."""
    path = rank_state_file(folder, process_index)
    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework='pt') as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        expected = random_state()
        states = []
        for prefix in ('batch', 'step'):
            state = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + '.')}
            if not state and prefix == 'batch':
                continue
            for key, ref in expected.items():
                got = state.get(key)
                if got is None or got.dtype != ref.dtype or got.shape != ref.shape:
                    raise ValueError(f'{prefix}.{key} is not a random state of this machine')
            states.append(state)
        loss_sum, batches = tensors['loss_sum'], tensors['batches']
        if loss_sum.shape != (1,) or not torch.isfinite(loss_sum).all() or batches.shape != (1,) or batches[0] < 0:
            raise ValueError('loss_sum and batches must be a finite number and a count')
        keep = random_state()
        try:  # Python and torch check a state as they load it: one that does not load is refused here
            for state in states:
                set_random_state(state)
        finally:
            set_random_state(keep)
    except (OSError, KeyError, ValueError, RuntimeError, OverflowError) as e:
        raise InputError(f'cannot resume from {folder}: {os.path.basename(path)}: {first_line(e)}') from None
    return states, loss_sum[0], int(batches[0])
