""" Ctrl-C held back while a run writes its files, so an interrupted run leaves whole files behind."""
import contextlib
import signal
import threading
from typing import Iterator

__all__ = ['files_written_whole']


@contextlib.contextmanager
def files_written_whole() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that arrives inside the block until the block is done, then raise it.

    Checkpoints and model folders are then never left half written, and no picture is interrupted
    half drawn (matplotlib's font code, interrupted, can abort the interpreter at exit). A second
    Ctrl-C interrupts at once. Only on the main thread, and only where SIGINT has Python's own
    handler: a caller's handler is left alone. The previous handler is restored on exit.
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    received = []

    def hold(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
