""" A Ctrl-C that arrives while a run writes its files waits for them, then interrupts."""
import os
import signal

import pytest

from dropcluster_timm.train.interrupt import files_written_whole


@pytest.fixture(autouse=True)
def python_ctrl_c():
    """Python's own Ctrl-C handler, as an interactive run has it: a suite started in the background
    inherits SIGINT ignored, and a run that ignores Ctrl-C is left to ignore it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_inside_waits_for_the_block_then_interrupts():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with files_written_whole():
            os.kill(os.getpid(), signal.SIGINT)
            done.append('the rest of the block ran')
    assert done == ['the rest of the block ran']
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_interrupts_at_once():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with files_written_whole():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            done.append('not reached')
    assert done == [] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_no_ctrl_c_no_interrupt_and_a_callers_own_handler_is_left_alone():
    with files_written_whole():
        pass
    seen = []
    previous = signal.signal(signal.SIGINT, lambda *a: seen.append('caller'))
    try:
        with files_written_whole():
            os.kill(os.getpid(), signal.SIGINT)
        assert seen == ['caller']
    finally:
        signal.signal(signal.SIGINT, previous)
