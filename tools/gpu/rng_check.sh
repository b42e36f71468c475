#!/usr/bin/env bash
# The run's own random generator on the GPU (docs/TRAINING.md, "every random draw of a run"): the
# generator's CUDA tests, then the seed recipe eager, captured (twice) and captured with gradient
# checkpointing, with adapter dropout so that masks are drawn inside the graphs and replayed by the
# recomputation; and, for the time per step, the captured seed recipe with this build and with a
# build from before the change (.gpu/examples/train_naruto_before), in the same call.
#
#   bash tools/gpu/rng_check.sh [STEPS]
#       (.gpu/examples/train_naruto[_before].xz, .gpu/tests/{rng,locon}.xz: stripped, xz-compressed
#        binaries; .gpu/naruto512 from tools/demo/make_dataset.py; the diffusers wheel in .whl/)
set -uo pipefail
cd "$(dirname "$0")/../.."
steps=${1:-12}
out=${OUT:-/tmp/rng-check}
source tools/gpu/setup.sh
gpu_setup rng-check.log
for packed in .gpu/examples/*.xz .gpu/tests/*.xz; do
    xz -d -k -f "$packed" && chmod +x "${packed%.xz}"
done
export SDXL_FIXTURES=$PWD/tests/fixtures SDXL_REQUIRE_CUDA=1
echo "== torch-cuda rng tests"
./.gpu/tests/rng --test-threads=1 2>&1 | grep -E '^test |test result'
echo "== sdxl-model locon tests (checkpointed dropout replayed inside a CUDA graph)"
./.gpu/tests/locon --test-threads=1 2>&1 | grep -E '^test |test result'
model=/tmp/sdxl-random
[ -f "$model/unet/config.json" ] || python3 tools/gpu/random_sdxl.py --out "$model" | tail -1
run() {  # BINARY NAME STEPS FLAGS...
    local binary=$1 name=$2 n=$3; shift 3
    echo "== $binary $name: $*"
    timeout 300 "./.gpu/examples/$binary" --pretrained_model_name_or_path "$model" --dataset_name .gpu/naruto512 \
        --max_train_steps "$n" --logging_steps 2 --checkpointing_steps "$n" --validation_prompt none \
        --output_dir "/tmp/run-$name" "$@" 2>&1 | grep -v '^\s*$' | tail -4
    cp "/tmp/run-$name/logs/metrics.jsonl" "$out/metrics-$name.jsonl" 2>/dev/null
}
run train_naruto eager "$steps" --lora_dropout 0.1
run train_naruto graph "$steps" --lora_dropout 0.1 --cuda_graph
run train_naruto graph-again "$steps" --lora_dropout 0.1 --cuda_graph
run train_naruto graph-checkpointed "$steps" --lora_dropout 0.1 --cuda_graph --gradient_checkpointing
run train_naruto_before before-timing 40 --cuda_graph
run train_naruto after-timing 40 --cuda_graph
run train_naruto_before before-timing-2 40 --cuda_graph
run train_naruto after-timing-2 40 --cuda_graph
python3 - <<'PY'
import json
def steady(name):
    try:
        rows = [json.loads(l) for l in open(f"/tmp/run-{name}/logs/metrics.jsonl")]
    except OSError:
        return None
    rows = [r for r in rows if "loss" in r]
    a, b = rows[len(rows) // 4], rows[-1]
    return (round((b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"]), 5),
            rows[-1].get("peak_memory_gib"), [round(r["loss"], 6) for r in rows])
for name in ["eager", "graph", "graph-again", "graph-checkpointed",
             "before-timing", "after-timing", "before-timing-2", "after-timing-2"]:
    print(name, "steady s/step, peak GiB, losses:", steady(name))
PY
python3 tools/gpu/compare_loras.py eager graph graph-again graph-checkpointed --label "final LoRA"
python3 tools/gpu/compare_loras.py graph graph-again --label "final LoRA"
python3 tools/gpu/compare_loras.py before-timing after-timing before-timing-2 after-timing-2 --label "final LoRA"
echo "== done $(date -u +%FT%TZ)"
