""" Accelerate's process-wide state, left as the caller had it.

Accelerate keeps one state per process (``PartialState``, ``AcceleratorState``, ``GradientState``):
the first ``Accelerator`` fixes the device, the mixed precision and the process group for every later
one. A library call that builds an ``Accelerator`` (a training run, an evaluation) takes down what it
set up when it returns, so the caller's next ``Accelerator`` is built from its own arguments; a
state the caller set up (its own ``PartialState()`` or ``Accelerator``) stays as it was.
Accelerate has no public reset; its private one is called here and nowhere else.
"""
import contextlib
import os
from typing import Iterator

from accelerate.state import AcceleratorState, GradientState, PartialState

__all__ = ['scoped_accelerate_state', 'is_main_process']


@contextlib.contextmanager
def scoped_accelerate_state() -> Iterator[None]:
    """Within the block, Accelerate's state may be set up; on leaving it, every part that was not set up
    on entering is taken down (the process group it started included)."""
    had = {cls: bool(cls._shared_state) for cls in (PartialState, AcceleratorState, GradientState)}
    try:
        yield
    finally:
        if not had[PartialState] and PartialState._shared_state:
            PartialState().destroy_process_group()
        for cls in (GradientState, AcceleratorState, PartialState):
            if not had[cls]:
                cls._reset_state()


def is_main_process() -> bool:
    """Whether this is the main process (of ``accelerate launch`` or torchrun), without setting up
    Accelerate's state when there is none yet (the launcher's ``RANK`` then tells)."""
    if PartialState._shared_state:
        return PartialState().is_main_process
    return int(os.environ.get('RANK', '0')) == 0
