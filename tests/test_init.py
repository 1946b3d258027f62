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
