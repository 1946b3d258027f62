""" Shared fixtures: a Hugging Face cache folder laid out by the test, read offline."""
import shutil
from pathlib import Path
from typing import Dict

import huggingface_hub.constants
import pytest


class HfCache:
    """A real Hugging Face hub cache folder (``models--org--name/refs/main``, ``snapshots/<rev>/...``)."""

    def __init__(self, root: Path):
        self.root = root

    def add(self, repo_id: str, files: Dict[str, Path], revision: str = '0' * 39 + '1') -> Path:
        org, name = repo_id.split('/')
        repo = self.root / f'models--{org}--{name}'
        (repo / 'refs').mkdir(parents=True, exist_ok=True)
        (repo / 'refs' / 'main').write_text(revision)
        snapshot = repo / 'snapshots' / revision
        snapshot.mkdir(parents=True, exist_ok=True)
        for filename, src in files.items():
            shutil.copyfile(src, snapshot / filename)
        return snapshot


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> HfCache:
    """An empty HF cache under tmp_path, with HF_HUB_OFFLINE=1: any download attempt fails."""
    root = tmp_path / 'hf_home' / 'hub'
    root.mkdir(parents=True)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HOME', str(root.parent))
    monkeypatch.setenv('HF_HUB_CACHE', str(root))
    # huggingface_hub reads the variables once, at import.
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HOME', str(root.parent))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(root))
    return HfCache(root)


@pytest.fixture(scope='session')
def image_folder(tmp_path_factory):
    """A small ImageFolder root with train/ and validation/ (3 classes, 36 + 12 images)."""
    from run_helpers import make_image_folder
    return make_image_folder(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='session')
def full_run(image_folder, tmp_path_factory):
    """The output folder of a complete 3-epoch DropCluster run on ``image_folder``."""
    from run_helpers import TINY, run_script
    out = str(tmp_path_factory.mktemp('runs') / 'full')
    run_script([image_folder, '--output', out] + TINY)
    return out


@pytest.fixture(scope='session')
def train_test_folder(tmp_path_factory):
    """CIFAR's layout: train/ and test/, no validation/ folder."""
    from run_helpers import make_image_folder, relayout
    return relayout(make_image_folder(tmp_path_factory.mktemp('cifar_layout')), {'validation': 'test'})
