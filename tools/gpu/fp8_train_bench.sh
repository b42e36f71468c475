#!/usr/bin/env bash
# fp8 base weights multiplied in fp8 while training (issue 21, deliverable 4; docs/TRAINING.md "fp8
# products", docs/BENCHMARKS.md): torch-cuda's fp8 tests on the GPU, then the captured seed recipe
# channels-last in bf16, with --gradient_checkpointing, and with fp8 base weights widened
# (--fp8_base_weights), multiplied in fp8 (--fp8_compute) and with fp8 input gradients too
# (--fp8_gradients), with and without checkpointing: steady time per step, peak, MFU, and each final
# LoRA against the bf16 checkpointed run's (and a repeat of it: the run-to-run spread); one profiled
# step of the fp8 products with fp8 gradients. Also flash attention and cuDNN's tried first
# (--attention flash, --attention cudnn) against libtorch's own order, and their test.
#
#   bash tools/gpu/fp8_train_bench.sh [STEPS]      (STEPS a multiple of 20, default 40; RUNS="seed fp8g ..."
#       picks runs, SECONDS_LEFT the time they may take, NO_PROFILE=1 skips the profiled step)
#       (.gpu/examples/train_naruto.xz, .gpu/tests/fp8.xz, .gpu/tests/attention_cuda.xz: stripped,
#        xz-compressed release binaries; the diffusers wheel in .whl/ for tools/gpu/random_sdxl.py)
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
for t in fp8 attention_cuda; do
    [ -x ".gpu/tests/$t" ] || continue
    echo "== $t tests"
    SDXL_REQUIRE_CUDA=1 "./.gpu/tests/$t" --test-threads=1 --nocapture 2>&1 \
        | grep -E '^test |test result|bound|gradient|refused|cuDNN|panicked|differ|order'
done
seed_bench_data /tmp/patterns 16
filter="^\[trainer\] (step (2|$steps)\b|captured|fp8 products|linear layers)|rror"
# RUNS picks and orders the runs (default: all); each starts only with 60 s left of SECONDS_LEFT
# (default 540, a call's 600 s less the setup), so the table still prints inside the call.
read -r -a runs <<<"${RUNS:-seed cudnn ckpt fp8w-ckpt fp8c-ckpt fp8g-ckpt fp8g ckpt2}"
deadline=$((SECONDS + ${SECONDS_LEFT:-540}))
for run in "${runs[@]}"; do
    case "$run" in
        seed) flags="" ;;
        flash) flags="--attention flash" ;;
        cudnn) flags="--attention cudnn" ;;
        ckpt | ckpt2) flags="--gradient_checkpointing" ;;
        fp8w-ckpt) flags="--gradient_checkpointing --fp8_base_weights" ;;
        fp8c-ckpt) flags="--gradient_checkpointing --fp8_base_weights --fp8_compute" ;;
        fp8g-ckpt) flags="--gradient_checkpointing --fp8_base_weights --fp8_compute --fp8_gradients" ;;
        fp8g) flags="--fp8_base_weights --fp8_compute --fp8_gradients" ;;
        *) echo "fp8_train_bench: unknown run '$run'" >&2; exit 2 ;;
    esac
    if [ $((deadline - SECONDS)) -lt 60 ]; then
        echo "== $run: not run (SECONDS_LEFT spent)"
        continue
    fi
    # shellcheck disable=SC2086
    seed_bench_run "$run" "$filter" "$steps" --channels_last $flags
done
seed_bench_table "$steps" "${runs[@]}"
python3 - ckpt "${runs[@]}" <<'PY'
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
base_name, *others = [n for i, n in enumerate(sys.argv[1:]) if i == 0 or n != sys.argv[1]]
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
if [ $((deadline - SECONDS)) -ge 60 ] && [ -z "${NO_PROFILE:-}" ]; then
    seed_bench_run profile-fp8g "$filter" 7 --channels_last --fp8_base_weights --fp8_compute --fp8_gradients --profile_step 5
    for trace in /tmp/run-profile-fp8g/profile/*.json; do
        [ -f "$trace" ] && python3 tools/gpu/profile_summary.py "$trace" --top 25 --json "$out/summary-fp8g.json"
    done
fi
