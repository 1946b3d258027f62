import pytest
import torch
import torch.nn.functional as F

from dropcluster_timm.evaluation.corruptions import CORRUPTIONS, corrupt


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


# ----------------------------------------------------------------------------------------------
# corruption_accuracy: the evaluation over a loader


def _model_and_loader(batches=2, batch_size=6):
    import timm
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=3, channels=(8, 8, 8, 8), stem_width=8)
    g = torch.Generator().manual_seed(3)
    loader = [(torch.rand(batch_size, 3, 32, 32, generator=g), torch.randint(0, 3, (batch_size,), generator=g))
              for _ in range(batches)]
    return model, loader


def test_corruption_accuracy_report_is_consistent_and_repeatable():
    from dropcluster_timm.evaluation.corruptions import corruption_accuracy
    model, loader = _model_and_loader()
    a = corruption_accuracy(model, loader, seed=5)
    b = corruption_accuracy(model, loader, seed=5)
    assert a == b
    assert list(a['corruptions']) == list(CORRUPTIONS) and all(len(v) == 5 for v in a['corruptions'].values())
    assert a['num_images'] == 12 and a['severities'] == [1, 2, 3, 4, 5]
    flat = [v for accs in a['corruptions'].values() for v in accs]
    assert a['mean_corruption_top1'] == pytest.approx(sum(flat) / 40)
    for name, accs in a['corruptions'].items():
        assert a['mean_per_corruption'][name] == pytest.approx(sum(accs) / 5)
    # clean top-1 computed by hand
    model.eval()
    with torch.no_grad():
        hits = sum((model(x).argmax(-1) == y).sum().item() for x, y in loader)
    assert a['top1'] == pytest.approx(100 * hits / 12)


def test_corruption_accuracy_matches_hand_computation_and_subsets():
    from dropcluster_timm.evaluation.corruptions import corruption_accuracy
    model, loader = _model_and_loader()
    pre = lambda x: (x - 0.5) / 0.25  # noqa: E731
    # contrast draws no random numbers: the accuracy can be recomputed with corrupt() directly
    sub = corruption_accuracy(model, loader, ['contrast'], [2, 5], preprocess=pre)
    model.eval()
    with torch.no_grad():
        for k, s in enumerate((2, 5)):
            hits = sum((model(pre(corrupt(x, 'contrast', s))).argmax(-1) == y).sum().item() for x, y in loader)
            assert sub['corruptions']['contrast'][k] == pytest.approx(100 * hits / 12)
    # random corruptions draw from a stream per (batch, corruption, severity): a subset reproduces the full run
    full = corruption_accuracy(model, loader, preprocess=pre, seed=1)
    part = corruption_accuracy(model, loader, ['shot_noise', 'impulse_noise'], preprocess=pre, seed=1)
    for name in ('shot_noise', 'impulse_noise'):
        assert part['corruptions'][name] == full['corruptions'][name]
    # gather sees every image's hits (clean + 40 variants) and its result is what is counted
    seen = []

    def gather(hits):
        seen.append(tuple(hits.shape))
        return torch.cat([hits, hits])  # as if two processes held the same images
    doubled = corruption_accuracy(model, loader, preprocess=pre, seed=1, gather=gather)
    assert seen == [(6, 41), (6, 41)] and doubled['num_images'] == 24
    assert doubled['mean_corruption_top1'] == pytest.approx(full['mean_corruption_top1'])


def test_corruption_accuracy_rejects_bad_arguments():
    from dropcluster_timm.evaluation.corruptions import corruption_accuracy
    model, loader = _model_and_loader()
    with pytest.raises(ValueError, match='unknown corruption'):
        corruption_accuracy(model, loader, ['fog'])
    with pytest.raises(ValueError, match='severities'):
        corruption_accuracy(model, loader, severities=[0, 6])
    with pytest.raises(ValueError, match='no images'):
        corruption_accuracy(model, [])
