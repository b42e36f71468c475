#!/usr/bin/env bash
# The trainer's whole-step CUDA graphs beside its eager step and beside diffusers (eager and captured)
# in one GPU-machine run (docs/BENCHMARKS.md): the seed recipe on a random-weight SDXL-base folder.
#
#   bash tools/gpu/train_graph_compare.sh [STEPS] [REF_STEPS]   (after scripts/gpu-pack.sh --example train_naruto,
#                                                               .gpu/naruto512 and the wheels in .whl/, as train_compare.sh)
set -uo pipefail
cd "$(dirname "$0")/../.."
steps=${1:-30} ref_steps=${2:-20}
out=${OUT:-/tmp/train-graph-compare}
source tools/gpu/setup.sh
gpu_setup train-graph-compare.log
model=/tmp/sdxl-random
[ -f "$model/unet/config.json" ] || python3 tools/gpu/random_sdxl.py --out "$model" | tail -1
run() {  # NAME FLAGS...
    local name=$1; shift
    echo "== train_naruto $name: $*"
    timeout 200 ./.gpu/examples/train_naruto --pretrained_model_name_or_path "$model" --dataset_name .gpu/naruto512 \
        --max_train_steps "$steps" --logging_steps 5 --checkpointing_steps "$steps" --validation_prompt none \
        --output_dir "/tmp/run-$name" "$@" 2>&1 | grep -v '^\s*$' | tail -6
    cp "/tmp/run-$name/logs/metrics.jsonl" "$out/metrics-$name.jsonl" 2>/dev/null
}
run eager
run graph --cuda_graph
run graph-checkpointed --cuda_graph --gradient_checkpointing
python3 - <<'PY'
import json
def steady(name):
    try:
        rows = [json.loads(l) for l in open(f"/tmp/run-{name}/logs/metrics.jsonl")]
    except OSError:
        return None
    a, b = rows[1], rows[-1]
    return (b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"]), rows[-1]["peak_memory_gib"], [round(r["loss"], 5) for r in rows]
for name in ["eager", "graph", "graph-checkpointed"]:
    print(name, "steady s/step, peak GiB, losses:", steady(name))
PY
python3 tools/gpu/compare_loras.py eager graph graph-checkpointed --label "final LoRA"
echo "== diffusers reference, eager and captured"
timeout 240 python3 tools/gpu/reference_train.py --steps "$ref_steps" --warmup 3 --lora-dtype fp32 --cuda-graph \
    --json "$out/reference-graph.json" 2>&1 | grep -v Warning | grep -v "kept in float32" | tail -6
echo "== done $(date -u +%FT%TZ)"
