#!/usr/bin/env bash
# Issue 19's GPU check, on one GPU:
#  1. torch_cuda::dist on CUDA (the torch-cuda test `dist`: NCCL sums, MAX, broadcast, all_gather and an
#     all-reduce captured in a CUDA graph and replayed; the Gloo tests too);
#  2. the seed recipe (512 px, batch 2 x accumulation 2, bf16, 8-bit AdamW, LoRA rank 4, --cuda_graph) without a
#     process group and under `torchrun --nproc-per-node 1 --no-python` (a c10d group of one: NCCL, the gradient
#     all-reduce captured in the optimizer step's graph), interleaved twice: steady s/step of each, and how far
#     the LoRAs of the two launches lie apart beside how far two runs of the same launch do (the recipe's backward
#     is not bitwise reproducible on a GPU: some of its CUDA kernels accumulate with atomics).
#
#   CARGO_TARGET_DIR=... scripts/gpu-pack.sh --example train_naruto --test dist   (here), then on the GPU machine:
#   bash tools/gpu/ddp_overhead.sh [STEPS] [IMAGES]      (DIST_TESTS=0 skips the whole dist test file)
set -uo pipefail
cd "$(dirname "$0")/../.."
steps=${1:-80} images=${2:-16}
out=${OUT:-/tmp/ddp-overhead}
source tools/gpu/setup.sh
gpu_setup "ddp-overhead.log"
echo "== torch-cuda dist tests (NCCL)"
export TORCH_CUDA_DIST_NATIVE_BACKTRACE=1
if [ "${DIST_TESTS:-1}" = 1 ]; then
    NCCL_DEBUG=${NCCL_DEBUG:-WARN} timeout 180 bash scripts/gpu-entry.sh tests/dist 2>&1 \
        | grep -E "^test |test result|panicked|rank [0-9]|NCCL|rror|native stack|\.so\(|dist\(" | cut -c1-300
fi
# The NCCL rank alone (world of one) under c10d's switches, to tell which part of ProcessGroupNCCL a failure
# comes from; the first setting that passes is the one the training runs below use.
nccl_env=""
for setting in "" "TORCH_NCCL_TRACE_BUFFER_SIZE=0" "TORCH_NCCL_ENABLE_MONITORING=0 TORCH_NCCL_ASYNC_ERROR_HANDLING=0" \
    "NCCL_CUMEM_ENABLE=0" "TORCH_NCCL_AVOID_RECORD_STREAMS=1 TORCH_NCCL_TRACE_BUFFER_SIZE=0 TORCH_NCCL_ENABLE_MONITORING=0"; do
    # shellcheck disable=SC2086
    env $setting TORCH_CUDA_DIST_SCENARIO=nccl TORCH_CUDA_DIST_MARKER=/tmp/nccl-marker RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 \
        MASTER_ADDR=127.0.0.1 MASTER_PORT=$((29600 + RANDOM % 300)) SDXL_FIXTURES="$PWD/tests/fixtures" \
        timeout 60 ./.gpu/tests/dist --ignored --exact dist_child --nocapture >/tmp/nccl-one.log 2>&1
    rc=$?
    echo "nccl rank alone [${setting:-defaults}]: exit $rc"
    if [ $rc -eq 0 ]; then
        [ -n "$nccl_env" ] || nccl_env="${setting:-none}"
    elif [ -z "$setting" ]; then
        grep -E "native stack|\.so\(|dist\(|panicked|rror" /tmp/nccl-one.log | grep -v "^frame #" | head -40 | cut -c1-250
    fi
done
echo "training runs use: ${nccl_env:-defaults (nothing passed)}"
[ "${nccl_env:-none}" = none ] || export $nccl_env
source tools/gpu/seed_bench.sh
seed_bench_data /tmp/ddp-data "$images"
torchrun=(python3 -m torch.distributed.run --nproc-per-node 1 --no-python)
filter='^\[trainer\] (c10d|captured|data parallel)|^done|rror|NCCL WARN|native stack|\.so\(|train_naruto\(|exitcode'
rm -rf /tmp/run-*
for round in a b; do
    seed_bench_run "seed-$round" "$filter" "$steps" --logging_steps 2
    SEED_BENCH_LAUNCH="${torchrun[*]}" seed_bench_run "torchrun1-$round" "$filter" "$steps" --logging_steps 2
done
seed_bench_table "$steps" seed-a torchrun1-a seed-b torchrun1-b
python3 - <<'PY'
from safetensors.torch import load_file
def load(name):
    try:
        return load_file(f"/tmp/run-{name}/pytorch_lora_weights.safetensors")
    except Exception as e:
        print(f"{name}: {e}")
def compare(x, y):
    a, b = load(x), load(y)
    if a is None or b is None:
        return
    same = sum(bool((a[k] == b[k]).all()) for k in a)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    num = sum(((a[k].float() - b[k].float()) ** 2).sum().item() for k in a) ** 0.5
    den = sum((a[k].float() ** 2).sum().item() for k in a) ** 0.5
    print(f"{x} vs {y}: {same}/{len(a)} tensors bitwise equal, relative L2 {num / den:.3e}, max |diff| {worst:.3e}")
compare("seed-a", "seed-b")            # the same launch twice: the GPU's run-to-run spread
compare("torchrun1-a", "torchrun1-b")
compare("seed-a", "torchrun1-a")       # the two launches
compare("seed-b", "torchrun1-b")
PY
