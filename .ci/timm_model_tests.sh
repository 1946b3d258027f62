#!/usr/bin/env bash
# Run timm's own per-model test suite (tests/test_models.py of the installed timm version, taken from
# its source distribution on the package index at test time, never committed) against every
# registered *_dropcluster model.
#
# Selected: every test function of test_models.py that parametrizes over the model registry, for
# model names containing "dropcluster" (-k dropcluster), plus the functions that select models by
# module name, called on our models (see below). Deselected: test_model_load_pretrained and
# test_model_features_pretrained and test_model_inference, which download published weights (and, for
# the inference test, reference outputs) from the Hub (no network in CI; tests/test_models.py covers
# loading weights with a local HF cache).
#
# Models: by default a representative subset, one or more of each block type and timm module
# (MODELS below; CI runs it); `--all` runs every registered *_dropcluster model (172 with timm 1.0.31;
# about 25 minutes on 2 cores).
#
# Usage: .ci/timm_model_tests.sh [--all] [extra pytest args]
set -euo pipefail
MODELS="resnet18_dropcluster resnet50d_dropcluster resnext50_32x4d_dropcluster seresnet50_dropcluster \
wide_resnet50_2_dropcluster skresnet18_dropcluster resnest14d_dropcluster res2net50_14w_8s_dropcluster \
gernet_s_dropcluster resnet33ts_dropcluster regnetz_b16_dropcluster mobilevit_xxs_dropcluster"
if [[ "${1:-}" == "--all" ]]; then
    MODELS=all
    shift
fi
export DROPCLUSTER_TIMM_TEST_MODELS="$MODELS"
cd "$(dirname "$0")/.."

timm_version=$(python -c 'import timm; print(timm.__version__)')
work=$(mktemp -d "${TMPDIR:-/tmp}/timm-model-tests.XXXXXX")
trap 'rm -rf "$work"' EXIT

python -m pip download -q --no-deps --no-binary :all: "timm==${timm_version}" -d "$work/sdist"
sdist=$(ls "$work"/sdist/timm-*.tar.gz)
tar -xzf "$sdist" -C "$work" --strip-components=1 "timm-${timm_version}/tests/test_models.py"

# The conftest imports dropcluster_timm before test_models.py builds its parametrization from
# timm.list_models(), so our models are in the registry.
cat > "$work/tests/conftest.py" <<'PY'
import os

import timm

import dropcluster_timm  # noqa: F401  registers *_dropcluster with timm

SELECTED = os.environ['DROPCLUSTER_TIMM_TEST_MODELS'].split()
MODELS = timm.list_models('*_dropcluster') if SELECTED == ['all'] else SELECTED


def pytest_collection_modifyitems(config, items):
    """Only the selected *_dropcluster models (timm's suite parametrizes over the whole registry)."""
    def selected(item):
        name = getattr(item, 'callspec', None) and item.callspec.params.get('model_name')
        return bool(name) and name.split('.')[0] in MODELS  # some tests take tagged names

    keep = [i for i in items if selected(i)]
    config.hook.pytest_deselected(items=[i for i in items if i not in keep])
    items[:] = keep
PY
# A few functions of test_models.py select models by timm module name (FEAT_INTER_FILTERS lists
# 'resnet', ours is 'resnet_dropcluster'); run those same functions, unchanged, on our models.
cat > "$work/tests/test_dropcluster_module_filtered.py" <<'PY'
import pytest

import test_models as timm_tests
from conftest import MODELS


@pytest.mark.parametrize('model_name', MODELS)
def test_model_forward_intermediates_features(model_name):
    timm_tests.test_model_forward_intermediates_features(model_name, batch_size=1)


@pytest.mark.parametrize('model_name', MODELS)
def test_model_forward_intermediates(model_name):
    timm_tests.test_model_forward_intermediates(model_name, batch_size=1)


# timm runs this one outside its CI (it prunes at every feature index): here on one model of each
# block type and stem (BasicBlock / 7x7 stem, Bottleneck / deep stem + avg-down, ByobNet) to stay fast.
@pytest.mark.parametrize('model_name', ['resnet18_dropcluster', 'resnet50d_dropcluster', 'gernet_s_dropcluster'])
def test_prune_intermediate_layers_contract(model_name):
    timm_tests.test_prune_intermediate_layers_contract(model_name)
PY
# Own ini: the markers timm's suite uses; none of this project's pytest options apply here.
cat > "$work/tests/pytest.ini" <<'PY'
[pytest]
markers =
    base
    forward
    backward
    cfg
    cfg_nonstd
    torchscript
    features
    fxforward
    fxbackward
    timeout(seconds): per-test timeout (pytest-timeout, if installed)
filterwarnings =
    ignore::DeprecationWarning
    ignore::FutureWarning
PY

cd "$work/tests"
python -m pytest -c pytest.ini -p no:cacheprovider -rA -q -n 2 \
    -k 'dropcluster and not test_model_load_pretrained and not test_model_features_pretrained and not test_model_inference' \
    test_models.py test_dropcluster_module_filtered.py "$@"
