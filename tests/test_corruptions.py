import pytest
import torch
import torch.nn.functional as F

from dropcluster_timm.corruptions import CORRUPTIONS, corrupt


def _images():
    """Textured 32x32 images: smooth shapes plus sharp-edged patches."""
    g = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.rand(4, 3, 8, 8, generator=g), size=(32, 32), mode='bilinear')
    edges = F.interpolate(torch.rand(4, 3, 16, 16, generator=g), size=(32, 32), mode='nearest')
    return (smooth + 0.5 * edges) / 1.5


# Pixelation at non-integer factors aliases, so its error is not monotonic: tested below instead.
@pytest.mark.parametrize('name', sorted(set(CORRUPTIONS) - {'pixelate'}))
def test_corruption_grows_with_severity_and_is_deterministic(name):
    x = _images()
    errors = []
    for severity in range(1, 6):
        a = corrupt(x, name, severity, torch.Generator().manual_seed(1))
        b = corrupt(x, name, severity, torch.Generator().manual_seed(1))
        assert torch.equal(a, b)
        assert a.shape == x.shape and a.dtype == x.dtype and a.min() >= 0 and a.max() <= 1
        errors.append((a - x).abs().mean().item())
    assert errors[0] > 0
    # Severity 5 is clearly worse than severity 1 (some steps are small, e.g. JPEG 65 vs 58).
    assert errors[4] > 1.3 * errors[0], errors


def test_noise_differs_between_seeds():
    x = _images()
    a = corrupt(x, 'gaussian_noise', 3, torch.Generator().manual_seed(1))
    b = corrupt(x, 'gaussian_noise', 3, torch.Generator().manual_seed(2))
    assert not torch.equal(a, b)


def test_specific_effects():
    x = _images()
    contrast = corrupt(x, 'contrast', 5)
    assert contrast.std(dim=(1, 2, 3)).lt(x.std(dim=(1, 2, 3))).all()
    bright = corrupt(x, 'brightness', 5)
    assert (bright.amax(1) >= x.amax(1) - 1e-6).all()
    def repeated(img):  # fraction of pixels equal to their right neighbour
        return (img[..., 1:] == img[..., :-1]).float().mean().item()
    assert repeated(x) < repeated(corrupt(x, 'pixelate', 1)) < repeated(corrupt(x, 'pixelate', 5))
    impulse = corrupt(x, 'impulse_noise', 5, torch.Generator().manual_seed(0))
    changed = (impulse != x)
    assert 0.03 < changed.float().mean() < 0.08
    assert set(impulse[changed].unique().tolist()) <= {0.0, 1.0}


def test_bad_arguments():
    x = _images()
    with pytest.raises(ValueError, match='unknown corruption'):
        corrupt(x, 'fog', 1)
    with pytest.raises(ValueError, match='severity'):
        corrupt(x, 'contrast', 0)
    with pytest.raises(ValueError, match='float images'):
        corrupt((x * 255).to(torch.uint8), 'contrast', 1)
