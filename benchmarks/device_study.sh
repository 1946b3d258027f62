#!/usr/bin/env bash
# The regulariser study's GPU protocol (run.py's `gpu` config: half-width ResNet-18 with the CIFAR stem,
# 5,000 images per seed, 60 epochs, bf16, channels-last, data resident on the GPU) as one device call:
# several runs at once in worker processes, each row appended to $OUT/runs.jsonl as it finishes; rows
# already committed in benchmarks/results/study_v3_gpu/ are copied in first and skipped. The driver
# starts no run that would end past $BUDGET minutes.
#
# Before the call, here (the GPU machine has no network, another timm and no ../shared):
#   echo /.whl/ >> .git/info/exclude; echo /.cifar/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl timm==1.0.31
#   mkdir -p .cifar && ln -f ../shared/data/cifar10-jpg.tar.gz .cifar/   # carried, never committed
# The call: run(command="COMMIT=$(git rev-parse HEAD) bash benchmarks/device_study.sh", carry=[".whl", ".cifar"],
#   timeout_s=600) with the commit written out; then commit $OUT/runs.jsonl to benchmarks/results/study_v3_gpu/.
#
# Dry run on a CPU (benchmarks/tests/test_regularizer_study.py): DEVICE=cpu CONFIG=tiny SEEDS="0 0" WORKERS=2 \
#   DATA=../shared/data/cifar10-jpg.tar.gz OUT=/tmp/device_out bash benchmarks/device_study.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
DEVICE=${DEVICE:-cuda}
CONFIG=${CONFIG:-gpu}
SEEDS=${SEEDS:-0 23}
WORKERS=${WORKERS:-8}
BUDGET=${BUDGET:-9}
DATA=${DATA:-.cifar/cifar10-jpg.tar.gz}
CACHE_DIR=${CACHE_DIR:-/tmp/dropcluster_cifar10}
COMMIT=${COMMIT:-unknown}
mkdir -p "$OUT"
source benchmarks/device_env.sh

if [ -f benchmarks/results/study_v3_gpu/runs.jsonl ] && [ ! -f "$OUT/runs.jsonl" ]; then
    cp benchmarks/results/study_v3_gpu/runs.jsonl "$OUT/runs.jsonl"
fi
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee "$OUT/env.txt"
# shellcheck disable=SC2086  # SEEDS is two numbers
python3 -m benchmarks.regularizer_study.run --config "$CONFIG" --device "$DEVICE" --seeds $SEEDS \
    --workers "$WORKERS" --budget-minutes "$BUDGET" --data "$DATA" --cache-dir "$CACHE_DIR" \
    --results "$OUT" --commit "$COMMIT" 2>&1 | tee "$OUT/driver.txt"
