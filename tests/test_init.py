""" ``import dropcluster_timm``: the core only; the Hub, card and training code load when used, EDropout
when imported."""
import subprocess
import sys


def test_import_loads_the_core_only_and_hub_names_on_use():
    code = ('import sys, dropcluster_timm, timm; '
            'heavy = ["accelerate", "dropcluster_timm.hub.save", "dropcluster_timm.hub.model_card", "dropcluster_timm.train", '
            '"dropcluster_timm.edropout", "matplotlib"]; '
            'print(sorted(m for m in heavy if m in sys.modules)); '
            'print("resnet18_dropcluster" in timm.list_models("*dropcluster*"), "resnet50_slim" in timm.list_models()); '
            'from dropcluster_timm import push, save_pretrained; print(push.__module__, "dropcluster_timm.hub.save" in sys.modules); '
            'import dropcluster_timm.edropout; print("resnet50_slim" in timm.list_models("*_slim"))')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split('\n')[:4] == ['[]', 'True False', 'dropcluster_timm.hub.push True', 'True']


def test_training_export_and_cards_never_import_edropout(image_folder, tmp_path):
    """EDropout is opt-in for real: a run without --edropout, export-plain and cards leave it unloaded."""
    from run_helpers import TINY, with_epochs
    args = with_epochs(TINY, 1) + ['--data-dir', image_folder, '--output', str(tmp_path / 'run')]
    code = ('import sys, timm, dropcluster_timm.train; from dropcluster_timm.cli import main; '
            f'assert main(["train"] + {args!r}) == 0; '
            f'assert main(["export-plain", {str(tmp_path / "run" / "best")!r}, {str(tmp_path / "plain")!r}]) == 0; '
            f'assert main(["cards", "--out-dir", {str(tmp_path / "cards")!r}]) == 0; '
            'print("dropcluster_timm.edropout" in sys.modules, "resnet50_slim" in timm.list_models())')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == 'False False'
