#!/usr/bin/env bash
# Channels-last UNet on the GPU (issue 21, deliverables 1 and 3; docs/BENCHMARKS.md): the channels-last
# group norm kernels' CUDA tests, then the captured seed recipe with NCHW and with --channels_last
# interleaved in the same call (steady time per step, peak, final LoRA against each other), the same
# with --gradient_checkpointing, and one profiled step of each layout summarized by kernel category.
#
#   bash tools/gpu/channels_last_bench.sh [STEPS]      (QUICK=1: the tests and one NCHW / channels-last pair)
#       (.gpu/examples/train_naruto.xz, .gpu/tests/group_norm.xz: stripped, xz-compressed release binaries;
#        the diffusers wheel in .whl/ for tools/gpu/random_sdxl.py)
set -uo pipefail
cd "$(dirname "$0")/../.."
steps=${1:-40}
out=${OUT:-/tmp/channels-last-bench}
source tools/gpu/setup.sh
gpu_setup channels-last-bench.log
source tools/gpu/seed_bench.sh
trap gpu_bundle EXIT  # metrics, summaries and images into $out/results.tgz
if [ $((steps % 20)) -ne 0 ]; then  # metrics are logged every 10 steps, read at STEPS/2 and STEPS
    echo "channels_last_bench: STEPS must be a multiple of 20 (got $steps)" >&2
    exit 2
fi
for packed in .gpu/examples/*.xz .gpu/tests/*.xz; do
    [ -f "$packed" ] && xz -d -k -f "$packed" && chmod +x "${packed%.xz}"
done
export SDXL_REQUIRE_CUDA=1
if [ -x .gpu/tests/group_norm ]; then
    echo "== torch-cuda group_norm tests"
    ./.gpu/tests/group_norm --test-threads=1 --nocapture 2>&1 | grep -E '^test |test result|max error|panicked'
fi
seed_bench_data /tmp/patterns 16
filter="^\[trainer\] (step (2|$steps)\b|captured)|rror"
seed_bench_run seed "$filter" "$steps"
seed_bench_run cl "$filter" "$steps" --channels_last
if [ "${QUICK:-0}" = 1 ]; then  # the kernels' tests and one pair of runs only
    seed_bench_table "$steps" seed cl
    exit 0
fi
seed_bench_run seed2 "$filter" "$steps"
seed_bench_run cl2 "$filter" "$steps" --channels_last
seed_bench_table "$steps" seed cl seed2 cl2
python3 - seed cl seed2 cl2 <<'PY'
# The final LoRA (diffusers file) of each run against the first: max |delta| over every tensor.
import sys
from safetensors.torch import load_file
runs = {n: load_file(f"/tmp/run-{n}/pytorch_lora_weights.safetensors") for n in sys.argv[1:]}
base_name, *others = sys.argv[1:]
base = runs[base_name]
scale = max(t.float().abs().max().item() for t in base.values())
for name in others:
    diff = max((runs[name][k].float() - base[k].float()).abs().max().item() for k in base)
    print(f"final LoRA {name} vs {base_name}: max |delta| {diff:.3e} (largest value {scale:.3e})")
PY
for layout in cl nchw; do
    flag=""; [ "$layout" = cl ] && flag="--channels_last"
    # shellcheck disable=SC2086
    seed_bench_run "profile-$layout" "$filter" 7 --profile_step 5 $flag
    for trace in /tmp/run-profile-$layout/profile/*.json; do
        [ -f "$trace" ] && python3 tools/gpu/profile_summary.py "$trace" --top 25 --json "$out/summary-$layout.json"
    done
done
seed_bench_run ckpt "$filter" "$steps" --gradient_checkpointing
seed_bench_run cl-ckpt "$filter" "$steps" --gradient_checkpointing --channels_last
seed_bench_table "$steps" seed cl seed2 cl2 ckpt cl-ckpt
