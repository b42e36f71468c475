#!/usr/bin/env bash
# The fused GEGLU on the GPU (issue 21, deliverable 2; docs/TRAINING.md, "The feed-forward's GEGLU"):
# its CUDA tests and the channels-last group norm's (the NVRTC code they share), then the captured seed
# recipe with --channels_last built before the change (.gpu/examples/train_naruto_before) and after it,
# interleaved in the same call, the final LoRAs against each other, and one profiled step after.
#
#   bash tools/gpu/geglu_bench.sh [STEPS]     (STEPS: a multiple of 20; default 40)
#       (.gpu/examples/train_naruto[_before].xz, .gpu/tests/{geglu,group_norm}.xz: stripped,
#        xz-compressed release binaries; the diffusers wheel in .whl/ for tools/gpu/random_sdxl.py)
set -uo pipefail
cd "$(dirname "$0")/../.."
steps=${1:-40}
out=${OUT:-/tmp/geglu-bench}
source tools/gpu/setup.sh
gpu_setup geglu-bench.log
source tools/gpu/seed_bench.sh
trap gpu_bundle EXIT
for packed in .gpu/examples/*.xz .gpu/tests/*.xz; do
    [ -f "$packed" ] && xz -d -k -f "$packed" && chmod +x "${packed%.xz}"
done
export SDXL_REQUIRE_CUDA=1
for t in geglu group_norm; do
    [ -x ".gpu/tests/$t" ] || continue
    echo "== torch-cuda $t tests"
    "./.gpu/tests/$t" --test-threads=1 --nocapture 2>&1 | grep -E '^test |test result|ulp|panicked'
done
seed_bench_data /tmp/patterns 16
filter="^\[trainer\] (step (2|$steps)\b|captured)|rror"
SEED_BENCH_BINARY=train_naruto_before seed_bench_run seed "$filter" "$steps" --channels_last
seed_bench_run geglu "$filter" "$steps" --channels_last
seed_bench_table "$steps" seed geglu
python3 - seed geglu <<'PY'
# The final LoRA (diffusers file) after the change against the one before: max |delta| over every tensor.
import sys
from safetensors.torch import load_file
a, b = (load_file(f"/tmp/run-{n}/pytorch_lora_weights.safetensors") for n in sys.argv[1:3])
scale = max(t.float().abs().max().item() for t in a.values())
diff = max((b[k].float() - a[k].float()).abs().max().item() for k in a)
print(f"final LoRA geglu vs seed: max |delta| {diff:.3e} (largest value {scale:.3e})")
PY
seed_bench_run profile-geglu "$filter" 7 --profile_step 5 --channels_last
for trace in /tmp/run-profile-geglu/profile/*.json; do
    [ -f "$trace" ] && python3 tools/gpu/profile_summary.py "$trace" --top 25 --json "$out/summary-geglu.json"
done
echo "== done $(date -u +%FT%TZ)"
