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
