""" ``dropcluster_timm.training``: the deprecated alias of the modules it was split into."""
import pytest

import dropcluster_timm.training as old
from dropcluster_timm import data, evaluate, model_helpers
from dropcluster_timm.train import loop, run_folder


@pytest.mark.parametrize('name, module', [
    ('build_data', data), ('DigitsDataset', data), ('evaluate_checkpoint', evaluate), ('TrainState', loop),
    ('save_checkpoint', run_folder), ('init_cluster_maps', model_helpers), ('cluster_state', model_helpers),
])
def test_old_names_warn_and_give_the_new_object(name, module):
    with pytest.warns(DeprecationWarning, match=f'training.{name} is deprecated: use {module.__name__}.{name}'):
        assert getattr(old, name) is getattr(module, name)


def test_removed_names_say_what_replaces_them():
    with pytest.raises(AttributeError, match='TrainConfig.check'):
        old.check_args
    with pytest.raises(AttributeError, match='hub.save_pretrained'):
        old.save_model_folder
    with pytest.raises(AttributeError, match='has no attribute'):
        old.not_a_name
