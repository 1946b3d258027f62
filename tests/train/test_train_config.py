""" The train command line and its typed configuration."""
import pytest

from dropcluster_timm import DropClusterSchedule
from dropcluster_timm.errors import InputError
from dropcluster_timm.train import parse_train_args as _parse


def parse_train_args(argv):
    """The config a run of ``argv`` trains with (the shares of the epochs filled in)."""
    return _parse(argv).resolved()


def test_drop_cluster_defaults_follow_the_run_length(tmp_path):
    cfg = parse_train_args(['--data-dir', str(tmp_path), '--epochs', '10'])
    assert (cfg.dropcluster.start_epoch, cfg.dropcluster.warmup_epochs, cfg.dropcluster.update_freq) == (2, 1, 1)
    cfg = parse_train_args(['--data-dir', str(tmp_path), '--epochs', '100'])  # the reference recipe
    assert (cfg.dropcluster.start_epoch, cfg.dropcluster.warmup_epochs, cfg.dropcluster.update_freq) == (20, 10, 10)
    cfg = parse_train_args(['--data-dir', str(tmp_path)])  # timm's 300 epochs
    assert (cfg.dropcluster.start_epoch, cfg.dropcluster.warmup_epochs, cfg.dropcluster.update_freq) == (60, 30, 30)
    cfg = parse_train_args([])  # the digits: 12 epochs
    assert (cfg.dropcluster.start_epoch, cfg.dropcluster.warmup_epochs, cfg.dropcluster.update_freq) == (3, 3, 3)
    cfg = parse_train_args(['--epochs', '4', '--drop-cluster-start', '0'])
    assert (cfg.dropcluster.start_epoch, cfg.dropcluster.warmup_epochs, cfg.dropcluster.update_freq) == (0, 1, 1)
    for epochs in (1, 2, 5, 20, 300):
        cfg = parse_train_args(['--data-dir', str(tmp_path), '--epochs', str(epochs)])
        schedule = DropClusterSchedule(cfg.dropcluster.rate, cfg.dropcluster.start_epoch, cfg.dropcluster.warmup_epochs,
                                       update_freq=cfg.dropcluster.update_freq, steps_per_epoch=10)
        assert schedule.peak_rate(epochs) == pytest.approx(cfg.dropcluster.rate), epochs
        # clusters are re-computed at epoch starts: a one-epoch run has none after its start
        assert bool(schedule.update_epochs(epochs)) == (epochs > 1), epochs


def test_config_is_typed_and_the_namespace_is_read_once(tmp_path):
    cfg = parse_train_args([str(tmp_path), '--model', 'resnet34_dropcluster', '--drop-cluster', '0.15',
                            '--input-size', '3', '40', '48', '--mean', '0.5', '0.5', '0.5', '--aa', 'rand-m9',
                            '--model-kwargs', 'dc_stem=True', '--no-progress', '--cluster-size', '9'])
    assert cfg.data.data_dir == str(tmp_path) and cfg.data.dataset == ''  # positional DATA_DIR: an ImageFolder
    assert cfg.data.input_size == (3, 40, 48) and cfg.data.mean == (0.5, 0.5, 0.5)
    assert cfg.data.train_transform_args()['auto_augment'] == 'rand-m9'
    assert cfg.data.input_args()['input_size'] == (3, 40, 48)
    assert cfg.model.name == 'resnet34_dropcluster' and cfg.model.kwargs == {'dc_stem': True}
    assert cfg.model.layer_options['cluster_size'] == 9 and 'num_clusters' not in cfg.model.layer_options
    assert cfg.dropcluster.rate == 0.15 and cfg.output.progress is False
    assert (cfg.optim.opt, cfg.optim.lr, cfg.optim.epochs) == ('sgd', None, 300)  # timm's defaults
    assert cfg.optim.scaled_lr(1024) == 0.4 and cfg.loss.smoothing == 0.1 and cfg.data.color_jitter == 0.4
    assert (cfg.optim.model_ema_decay, cfg.output.checkpoint_hist, cfg.optim.weight_decay) == (0.9998, 10, 2e-5)
    record = cfg.to_dict()
    assert record['model']['name'] == 'resnet34_dropcluster' and record['dropcluster']['rate'] == 0.15
    digits = parse_train_args([])
    assert digits.data.dataset == 'digits' and digits.model.kwargs == {'dc_stem': True}
    assert (digits.optim.opt, digits.data.img_size, digits.model.layer_options['cluster_size']) == ('adamw', 32, 16)


@pytest.mark.parametrize('argv, words', [
    (['--drop-cluster', '1.5'], ['--drop-cluster', 'in [0, 1)', '1.5']),
    (['--drop-block', '-0.1'], ['--drop-block', 'in [0, 1)']),
    (['--epochs', '0'], ['--epochs', '>= 1']),
    (['--num-clusters', '0'], ['--num-clusters', '>= 1']),
    (['--drop-cluster-warmup', '-1'], ['--drop-cluster-warmup', '>= 0']),
    (['--lr', '0'], ['--lr', '> 0']),
    (['--drop-cluster-shape', 'multistep'], ['--drop-cluster-milestones']),
    (['--drop-cluster-gamma', '0'], ['--drop-cluster-gamma', 'in (0, 1]']),
    (['--min-cluster-size', '40', '--max-cluster-size', '10'], ['--min-cluster-size 40', 'exceeds']),
    (['--min-cluster-size', '0'], ['--min-cluster-size', '>= 1']),
    (['--model-ema', '--model-ema-decay', '1'], ['--model-ema-decay', 'in (0, 1)']),
    (['--edropout', '--edropout-interval', '0'], ['--edropout-interval', '>= 1']),
    (['--edropout', '--edropout-converge', '-1'], ['--edropout-converge', '>= 0']),
])
def test_check_names_the_flag_and_the_value(argv, words):
    cfg = parse_train_args(argv)
    with pytest.raises(InputError) as e:
        cfg.check()
    assert all(w in str(e.value) for w in words), str(e.value)


def test_defaults_pass_the_check():
    parse_train_args([]).check()
    parse_train_args(['--data-dir', 'somewhere', '--epochs', '1']).check()


def test_dropcluster_model_defaults_are_not_given_to_other_models():
    """The digits defaults carry DropCluster model arguments (cluster size, a stem layer): a plain timm
    model, e.g. for --edropout, must not receive them (timm's ResNet would reject them)."""
    dc = parse_train_args([])
    assert dc.model.name == 'resnet18_dropcluster' and dc.model.layer_options == {'cluster_size': 16} and dc.model.kwargs == {'dc_stem': True}
    plain = parse_train_args(['--model', 'resnet18', '--edropout'])
    assert plain.model.layer_options == {} and plain.model.kwargs == {} and plain.edropout.enabled
    assert plain.to_dict()['edropout'] == dict(enabled=True, candidates=8, interval=2, converge_steps=100,
                                               keep_prob=0.5, batch_per_state=None, stages=[1, 2, 3, 4],
                                               unit='channel')
    # by default the 2 x 8 states are scored on one batch of images in all: 64 / 16 each
    assert plain.edropout.images_per_state(64) == 4 and plain.edropout.images_per_state(8) == 1
    assert parse_train_args(['--edropout-batch', '5']).edropout.images_per_state(64) == 5
