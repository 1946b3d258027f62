""" The embedded data set: scikit-learn's 8x8 handwritten digits, which work offline."""
import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import InputError

__all__ = ['EMBEDDED_DATASET', 'DigitsDataset']

EMBEDDED_DATASET = 'digits'


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes) as RGB PIL images.

    Ships inside scikit-learn, so it works offline. A fixed stratified split: 20% validation.
    """

    def __init__(self, split: str = 'train', transform=None):
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:  # pragma: no cover
            raise InputError('the embedded digits data set needs scikit-learn: pip install scikit-learn') from e
        digits = load_digits()
        images = (digits.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
        targets = digits.target.astype(np.int64)
        rng = np.random.RandomState(0)
        val = np.zeros(len(targets), dtype=bool)
        for c in range(10):
            idx = np.flatnonzero(targets == c)
            val[rng.permutation(idx)[:len(idx) // 5]] = True
        if split in ('train', 'training'):
            keep = ~val
        elif split in ('validation', 'val', 'test', 'eval'):
            keep = val
        else:
            raise InputError(f'unknown split {split!r} for the digits data set (train or validation)')
        self.images = [Image.fromarray(im).convert('RGB') for im in images[keep]]
        self.targets = targets[keep].tolist()
        self.transform = transform
        self.classes = [str(c) for c in range(10)]
        self.source = f'{EMBEDDED_DATASET}:{"train" if split in ("train", "training") else "validation"}'

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        img = self.images[index]
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]
