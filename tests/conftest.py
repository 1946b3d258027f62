""" Shared fixtures: a Hugging Face cache folder read offline, a Hub with faked network calls, a
re-clustered model, and small training runs."""
import shutil
from pathlib import Path
from typing import Dict

import huggingface_hub.constants
import pytest
import timm
import torch
from huggingface_hub import HfApi

from dropcluster_timm import set_drop_prob, update_clusters


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


@pytest.fixture(autouse=True)
def leaves_accelerate_alone(request):
    """No test leaves Accelerate's process-wide state behind (it would fix the next test's precision):
    ``train`` and ``evaluate`` take down what they set up; a test that builds its own Accelerator uses
    ``own_accelerator``."""
    from accelerate.state import is_initialized
    before = is_initialized()
    yield
    if not before and is_initialized() and 'own_accelerator' not in request.fixturenames:
        pytest.fail(f'{request.node.nodeid} left an Accelerate state behind')


@pytest.fixture
def own_accelerator():
    """For a test that builds its own ``Accelerator``: Accelerate's process-wide state is taken down
    after it (``train`` and ``evaluate`` do that themselves), so it fixes no later test's precision."""
    from dropcluster_timm.accelerate_state import scoped_accelerate_state
    with scoped_accelerate_state():
        yield


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
def one_epoch_run(image_folder, tmp_path_factory):
    """The output folder of a finished 1-epoch run of ``TINY`` on ``image_folder`` (copy it to change it)."""
    from run_helpers import TINY, with_epochs
    from dropcluster_timm.train import parse_train_args, train
    out = tmp_path_factory.mktemp('resume') / 'run'
    train(parse_train_args(with_epochs(TINY, 1) + ['--data-dir', image_folder, '--output', str(out)]))
    return out


@pytest.fixture(scope='session')
def train_test_folder(tmp_path_factory):
    """CIFAR's layout: train/ and test/, no validation/ folder."""
    from run_helpers import make_image_folder, relayout
    return relayout(make_image_folder(tmp_path_factory.mktemp('cifar_layout')), {'validation': 'test'})


@pytest.fixture
def trained(tmp_path):
    """A resnet18_dropcluster with learned per-channel maps at another resolution and a changed rate."""
    torch.manual_seed(0)
    model = timm.create_model('resnet18_dropcluster', num_classes=10, img_size=64, dc_stem=True,
                              dc_cluster_method='kmeans')
    update_clusters(model, torch.randn(4, 3, 96, 80))  # maps at 96 x 80, the model's grids are 64 x 64
    set_drop_prob(model, 0.15)
    return model.eval()


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Replace only HfApi's network methods; upload_folder keeps a copy of what it would upload."""
    calls = {}
    uploaded = tmp_path / 'uploaded'

    def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
        calls['create_repo'] = dict(repo_id=repo_id, private=private, token=self.token)
        return type('RepoUrl', (), {'repo_id': repo_id})()

    def repo_exists(self, repo_id, **kwargs):  # a test lists existing repos in calls['existing']
        return repo_id in calls.get('existing', ())

    def create_branch(self, repo_id, branch, exist_ok=False, **kwargs):
        calls['create_branch'] = dict(repo_id=repo_id, branch=branch)

    def upload_folder(self, repo_id, folder_path, revision=None, commit_message=None, allow_patterns=None, **kwargs):
        calls['upload_folder'] = dict(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        uploaded.mkdir()
        for p in Path(folder_path).iterdir():
            if allow_patterns is None or p.name in allow_patterns:
                shutil.copyfile(p, uploaded / p.name)
        return type('CommitInfo', (), {'commit_url': f'https://huggingface.co/{repo_id}/commit/abc'})()

    monkeypatch.setattr(HfApi, 'create_repo', create_repo)
    monkeypatch.setattr(HfApi, 'create_branch', create_branch)
    monkeypatch.setattr(HfApi, 'repo_exists', repo_exists)
    monkeypatch.setattr(HfApi, 'upload_folder', upload_folder)
    return calls, uploaded
