#!/usr/bin/env bash
# The GPU check as one device call: the fused kernel's tests on the GPU, then the layer and ResNet-50
# training-step benchmarks whose tables go into docs/benchmarks.md, then the compile benchmark. Each
# part writes its output to $OUT (the device tool brings that folder back); a failing part does not
# stop the later ones.
#
# Before the call, here (the GPU machine has no network and another timm):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl timm==1.0.31
# The call: run(command="bash benchmarks/device_fused_drop.sh", carry=[".whl"], timeout_s=600).
# The parts' limits add up to 9.6 minutes; the real run should take a fraction of that.
#
# Dry run on a CPU machine (checks the script, not the GPU): DEVICE=cpu IMG_SIZE=64 BATCH_SIZE=8 STEPS=2 \
#   OUT=/tmp/device_out bash benchmarks/device_fused_drop.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
DEVICE=${DEVICE:-cuda}
IMG_SIZE=${IMG_SIZE:-224}
BATCH_SIZE=${BATCH_SIZE:-128}
STEPS=${STEPS:-30}
mkdir -p "$OUT"
source benchmarks/device_env.sh

part() {  # part NAME SECONDS COMMAND...: run COMMAND under a time limit, output to the screen and $OUT/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]}"
}

part env 30 python3 -c "import torch, timm, triton; print('torch', torch.__version__, 'timm', timm.__version__,
'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
part tests 150 python3 -m pytest -q -p no:cacheprovider -rs tests/layers/test_fused_drop.py \
    tests/layers/test_drop_cluster.py::test_cuda_mask_made_on_device
part layer_fp32 70 python3 -m benchmarks.bench_layer --device "$DEVICE" --sections layers modes
part layer_bf16_cl 45 python3 -m benchmarks.bench_layer --device "$DEVICE" --sections layers --dtype bfloat16 --channels-last
part train_bf16 85 python3 -m benchmarks.bench_train --device "$DEVICE" --img-size "$IMG_SIZE" \
    --batch-size "$BATCH_SIZE" --steps "$STEPS" --amp
part train_bf16_cl 85 python3 -m benchmarks.bench_train --device "$DEVICE" --img-size "$IMG_SIZE" \
    --batch-size "$BATCH_SIZE" --steps "$STEPS" --amp --channels-last
# The self-driving model under torch.compile against the recipe-driven one (compiled and eager steps,
# compile times), beside the fused kernel it compiles into its graph.
part compile 110 python3 -m benchmarks.bench_compile --device "$DEVICE" --img-size "$IMG_SIZE" \
    --batch "$((BATCH_SIZE / 2))" --steps "$STEPS"
