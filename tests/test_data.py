""" Data sets: split folders found by name, never the whole root; overlapping splits refused."""
import os

import pytest

from dropcluster_timm.data import build_data
from dropcluster_timm.errors import TrainingError
from run_helpers import make_image_folder, relayout


def test_validation_split_is_found_by_name_never_the_whole_root(train_test_folder, tmp_path):
    data = build_data('', train_test_folder)
    assert os.path.basename(data.splits['validation']) == 'test' and len(data.eval) == 12  # not all 48 images
    assert os.path.basename(data.splits['train']) == 'train' and len(data.train) == 36
    # no held-out folder by any known name: refused, listing the folders and the flag
    other = relayout(make_image_folder(tmp_path / 'holdout'), {'validation': 'holdout'})
    with pytest.raises(TrainingError, match=r"folders found: holdout, train\); name one with --val-split"):
        build_data('', other)
    assert len(build_data('', other, val_split='holdout').eval) == 12
    with pytest.raises(TrainingError, match='overlaps the training split'):
        build_data('', train_test_folder, val_split='train')
    # no train folder either: never the root
    with pytest.raises(TrainingError, match='--train-split'):
        build_data('', os.path.join(train_test_folder, 'test'))


def test_num_classes_is_checked_against_the_data(image_folder):
    assert build_data('', image_folder, num_classes=3).num_classes == 3
    with pytest.raises(TrainingError, match='--num-classes 5 does not match the data set, which has 3 classes'):
        build_data('', image_folder, num_classes=5)
    with pytest.raises(TrainingError, match='does not exist'):
        build_data('', os.path.join(image_folder, 'nope'))
