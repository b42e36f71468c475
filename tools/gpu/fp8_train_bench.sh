#!/usr/bin/env bash
# fp8 base weights multiplied in fp8 while training (issue 21, deliverable 4; docs/TRAINING.md "fp8
# products", docs/BENCHMARKS.md): torch-cuda's fp8 tests on the GPU, then the captured seed recipe
# channels-last in bf16, with --gradient_checkpointing, and with fp8 base weights widened
# (--fp8_base_weights) and multiplied in fp8 (--fp8_base_weights --fp8_compute), with and without
# checkpointing: steady time per step, peak, MFU, and each final LoRA against the bf16 checkpointed
# run's (and a repeat of it: the run-to-run spread); one profiled step of the fp8 products.
#
#   bash tools/gpu/fp8_train_bench.sh [STEPS]      (STEPS a multiple of 20, default 40)
#       (.gpu/examples/train_naruto.xz, .gpu/tests/fp8.xz: stripped, xz-compressed release binaries;
#        the diffusers wheel in .whl/ for tools/gpu/random_sdxl.py)
set -uo pipefail
cd "$(dirname "$0")/../.."
steps=${1:-40}
out=${OUT:-/tmp/fp8-train-bench}
source tools/gpu/setup.sh
gpu_setup fp8-train-bench.log
source tools/gpu/seed_bench.sh
trap gpu_bundle EXIT  # metrics and the profile summary into $out/results.tgz
if [ $((steps % 20)) -ne 0 ]; then  # metrics are logged every 10 steps, read at STEPS/2 and STEPS
    echo "fp8_train_bench: STEPS must be a multiple of 20 (got $steps)" >&2
    exit 2
fi
for packed in .gpu/examples/*.xz .gpu/tests/*.xz; do
    [ -f "$packed" ] && xz -d -k -f "$packed" && chmod +x "${packed%.xz}"
done
if [ -x .gpu/tests/fp8 ]; then
    echo "== torch-cuda fp8 tests"
    SDXL_REQUIRE_CUDA=1 ./.gpu/tests/fp8 --test-threads=1 --nocapture 2>&1 \
        | grep -E '^test |test result|bound|gradient|refused|panicked'
fi
seed_bench_data /tmp/patterns 16
filter="^\[trainer\] (step (2|$steps)\b|captured|fp8 products|linear layers)|rror"
seed_bench_run seed "$filter" "$steps" --channels_last
seed_bench_run ckpt "$filter" "$steps" --channels_last --gradient_checkpointing
seed_bench_run fp8w-ckpt "$filter" "$steps" --channels_last --gradient_checkpointing --fp8_base_weights
seed_bench_run fp8c-ckpt "$filter" "$steps" --channels_last --gradient_checkpointing --fp8_base_weights --fp8_compute
seed_bench_run fp8c "$filter" "$steps" --channels_last --fp8_base_weights --fp8_compute
seed_bench_run ckpt2 "$filter" "$steps" --channels_last --gradient_checkpointing
seed_bench_table "$steps" seed ckpt fp8w-ckpt fp8c-ckpt fp8c ckpt2
python3 - ckpt ckpt2 fp8w-ckpt fp8c-ckpt fp8c seed <<'PY'
# The final LoRA (diffusers file) of each run against the bf16 checkpointed run's: max |delta| and the
# relative L2 difference over every tensor (ckpt2: the run-to-run spread).
import sys
from safetensors.torch import load_file
def load(name):
    try:
        return load_file(f"/tmp/run-{name}/pytorch_lora_weights.safetensors")
    except Exception as e:  # noqa: BLE001 - a missing run is reported, not fatal
        print(f"{name}: {e}")
        return None
base_name, *others = sys.argv[1:]
base = load(base_name)
for name in others:
    run = load(name)
    if base is None or run is None:
        continue
    diff = max((run[k].float() - base[k].float()).abs().max().item() for k in base)
    num = sum(((run[k].float() - base[k].float()) ** 2).sum().item() for k in base) ** 0.5
    den = sum((base[k].float() ** 2).sum().item() for k in base) ** 0.5
    print(f"final LoRA {name} vs {base_name}: max |delta| {diff:.3e}, relative L2 {num / den:.3e}")
PY
seed_bench_run profile-fp8c "$filter" 7 --channels_last --gradient_checkpointing --fp8_base_weights --fp8_compute --profile_step 5
for trace in /tmp/run-profile-fp8c/profile/*.json; do
    [ -f "$trace" ] && python3 tools/gpu/profile_summary.py "$trace" --top 25 --json "$out/summary-fp8c-ckpt.json"
done
