""" Data sets: split folders found by name, never the whole root; overlapping splits refused."""
import os

import pytest

from dropcluster_timm.data import build_data
from dropcluster_timm.errors import InputError
from run_helpers import make_image_folder, relayout


def test_validation_split_is_found_by_name_never_the_whole_root(train_test_folder, tmp_path):
    data = build_data('', train_test_folder)
    assert os.path.basename(data.splits['validation']) == 'test' and len(data.eval) == 12  # not all 48 images
    assert os.path.basename(data.splits['train']) == 'train' and len(data.train) == 36
    # no held-out folder by any known name: refused, listing the folders and the flag
    other = relayout(make_image_folder(tmp_path / 'holdout'), {'validation': 'holdout'})
    with pytest.raises(InputError, match=r"folders found: holdout, train\); name one with --val-split"):
        build_data('', other)
    assert len(build_data('', other, val_split='holdout').eval) == 12
    with pytest.raises(InputError, match='overlaps the training split'):
        build_data('', train_test_folder, val_split='train')
    # no train folder either: never the root
    with pytest.raises(InputError, match='--train-split'):
        build_data('', os.path.join(train_test_folder, 'test'))


def test_num_classes_is_checked_against_the_data(image_folder):
    assert build_data('', image_folder, num_classes=3).num_classes == 3
    with pytest.raises(InputError, match='--num-classes 5 does not match the data set, which has 3 classes'):
        build_data('', image_folder, num_classes=5)
    with pytest.raises(InputError, match='does not exist'):
        build_data('', os.path.join(image_folder, 'nope'))


def test_split_classes_must_match_by_name_and_number(tmp_path):
    root = make_image_folder(tmp_path / 'renamed')
    os.rename(os.path.join(root, 'validation', 'class_2'), os.path.join(root, 'validation', 'class_9'))
    with pytest.raises(InputError, match=r"different classes \(only in .*train: \['class_2'\]; only in "
                                            r".*validation: \['class_9'\]\); .* --class-map FILE"):
        build_data('', root)
    mapping = tmp_path / 'map.txt'  # timm's class map: one folder name a line, its index the line number
    mapping.write_text('class_0\nclass_1\nclass_2\nclass_9\n')
    assert build_data('', root, dataset_args={'class_map': str(mapping)}).num_classes == 4
    single = make_image_folder(tmp_path / 'single', classes=1)
    with pytest.raises(InputError, match=r'holds 1 class folder\(s\) with images: a classifier needs at least two'):
        build_data('', single)


def test_empty_folders_and_files_are_reported_once_and_too_many_stop(tmp_path, capsys):
    root = make_image_folder(tmp_path / 'gaps')
    os.makedirs(os.path.join(root, 'train', 'class_extra'))
    open(os.path.join(root, 'train', 'class_0', 'empty.jpg'), 'wb').close()
    with pytest.raises(InputError, match=r'1 of 37 image files are empty .* more than 1%, so the run stops'):
        build_data('', root)
    big = make_image_folder(tmp_path / 'big', train_per_class=40)
    os.makedirs(os.path.join(big, 'train', 'class_extra'))
    open(os.path.join(big, 'train', 'class_0', 'empty.jpg'), 'wb').close()
    capsys.readouterr()
    data = build_data('', big)
    err = capsys.readouterr().err
    assert data.num_classes == 3 and err.count('warning: ') == 2
    assert "1 class folder(s) hold no images and are not classes: ['class_extra']" in err
    assert '1 of 121 image files are empty' in err and 'skipped' in err


def test_a_folder_link_back_up_the_tree_is_refused_in_one_line_not_walked_forever(tmp_path):
    from run_helpers import assert_fails, run_script
    root = make_image_folder(tmp_path / 'data')
    os.symlink(os.path.join(root, 'train'), os.path.join(root, 'train', 'class_1', 'again'))
    proc = run_script(['--data-dir', root, '--output', str(tmp_path / 'run'), '--epochs', '1', '--img-size', '32'],
                      check=False, timeout=120)  # the old reader never returns: a timeout fails the test
    assert_fails(proc, ['class_1/again links back to', 'remove the link'])


def test_sixteen_bit_images_are_scaled_to_eight_bits_not_clipped(tmp_path):
    import numpy as np
    from PIL import Image
    from dropcluster_timm.data import make_dataset
    root = make_image_folder(tmp_path / 'data')
    levels = {'deep16.png': (np.full((16, 16), 40000, dtype=np.uint16), 156),  # 40000 / 65535 of white
              'dark16.png': (np.full((16, 16), 300, dtype=np.uint16), 1)}
    for name, (pixels, _) in levels.items():
        Image.fromarray(pixels).save(os.path.join(root, 'train', 'class_0', name))
    ds = make_dataset('', root, 'train')
    for name, (_, expected) in levels.items():
        index = next(i for i, (path, _) in enumerate(ds.reader.samples) if path.endswith(name))
        img, _ = ds[index]
        assert img.mode == 'RGB' and np.asarray(img).min() == np.asarray(img).max() == expected, name
    plain = next(i for i, (path, _) in enumerate(ds.reader.samples) if path.endswith('1.png'))
    assert np.array_equal(np.asarray(ds[plain][0]), np.asarray(Image.open(ds.reader.samples[plain][0]).convert('RGB')))
