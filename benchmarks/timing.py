""" Timing helpers shared by the benchmarks: device synchronisation and interleaved median timing."""
import statistics
import time

import torch

__all__ = ['synchronize', 'time_interleaved']


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` to finish (CUDA kernels run asynchronously); no-op on CPU."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_interleaved(fns, device, repeats, warmup=2):
    """Median seconds per call of each fn, calls interleaved round-robin so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            t = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}
