""" Runs that cannot be broken by the options timm users pass: channels-last weights are saved and
reload equal to the trained ones."""
import timm
import torch

from run_helpers import TINY, with_epochs
from dropcluster_timm.train import parse_train_args, train


def test_channels_last_run_saves_contiguous_weights_that_reload_equal(image_folder, tmp_path):
    out = tmp_path / 'run'
    result = train(parse_train_args(with_epochs(TINY, 1) + ['--data-dir', image_folder, '--output', str(out),
                                                            '--channels-last']))
    result.accelerator.end_training()
    trained = result.accelerator.unwrap_model(result.model).eval()
    assert trained.conv1.weight.is_contiguous(memory_format=torch.channels_last)  # the run's layout is kept
    reloaded = timm.create_model(f'local-dir:{out / "last"}', pretrained=True).eval()
    for (name, a), b in zip(trained.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # in the same layout, the same kernels: the same outputs
        assert torch.equal(trained(x), reloaded.to(memory_format=torch.channels_last)(x))
    assert (out / 'checkpoints' / 'epoch_0000').is_dir()
