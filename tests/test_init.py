""" ``import dropcluster_timm``: the core only; the Hub, card and training code load when used."""
import subprocess
import sys


def test_import_loads_the_core_only_and_hub_names_on_use():
    code = ('import sys, dropcluster_timm, timm; '
            'heavy = ["accelerate", "dropcluster_timm.hub", "dropcluster_timm.model_card", "dropcluster_timm.train", '
            '"matplotlib"]; '
            'print(sorted(m for m in heavy if m in sys.modules)); '
            'print("resnet18_dropcluster" in timm.list_models("*dropcluster*")); '
            'from dropcluster_timm import push, save_pretrained; print(push.__module__, "dropcluster_timm.hub" in sys.modules)')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split('\n')[:3] == ['[]', 'True', 'dropcluster_timm.hub True']
