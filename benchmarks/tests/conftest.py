""" Shared fixtures of the benchmark tests. """
from pathlib import Path

import pytest

from benchmarks.regularizer_study.data import load_cifar10

CIFAR = Path(__file__).resolve().parents[2].parent / 'shared' / 'data' / 'cifar10-jpg.tar.gz'


@pytest.fixture(scope='session')
def cifar_cache(tmp_path_factory):
    if not CIFAR.exists():
        pytest.skip(f'CIFAR-10 archive not found at {CIFAR}')
    cache = tmp_path_factory.mktemp('cifar_cache')
    load_cifar10(str(CIFAR), str(cache))
    return cache
