#!/usr/bin/env bash
# The pip user's path: build the sdist and the wheel (the wheel from the sdist), check what they hold,
# install the wheel into a fresh virtual environment (no system packages, so an undeclared dependency
# fails here), then from an empty folder outside the repository register the models, run the installed
# main job for a few steps and load its output with `local-dir:`.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python -m build --outdir "$work/dist" "$repo" > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
python .ci/check_dist.py "$work/dist"

python -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install -q torch==2.14.1 torchvision==0.29.1
"$py" -m pip install -q "$(ls "$work"/dist/*.whl)[train]"
"$py" -m pip check

mkdir "$work/empty" && cd "$work/empty"
"$py" - "$work/venv" <<'EOF'
import sys
import timm
import dropcluster_timm
assert dropcluster_timm.__file__.startswith(sys.argv[1]), f'imported {dropcluster_timm.__file__}, not the wheel'
names = timm.list_models('*_dropcluster')
assert 'resnet50_dropcluster' in names, names[:5]
timm.create_model('resnet50_dropcluster')
print(f'wheel: {len(names)} *_dropcluster models registered from {dropcluster_timm.__file__}')
EOF
"$work/venv/bin/accelerate" launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no \
    --dynamo_backend no -m dropcluster_timm train --output out --epochs 1 --train-batches-per-epoch 3 \
    > train.log 2>&1 || { cat train.log; exit 1; }
"$py" - <<'EOF'
import timm
import torch
from safetensors.torch import load_file
import dropcluster_timm  # noqa: F401
model = timm.create_model('local-dir:out/best', pretrained=True).eval()  # without pretrained: random weights
saved = load_file('out/best/model.safetensors')
assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items()), 'the loaded weights are not the saved ones'
cfg = model.pretrained_cfg
out = model(torch.zeros(2, *cfg['input_size']))
assert out.shape == (2, 10), out.shape
assert dropcluster_timm.dropcluster_layers(model), 'no DropCluster layers in the saved model'
print(f"wheel: the installed main job's output loads with local-dir: ({type(model).__name__}, {out.shape[1]} classes)")
EOF
