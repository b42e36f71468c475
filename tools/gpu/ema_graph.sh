#!/usr/bin/env bash
# --use_ema on the GPU (docs/TRAINING.md, "EMA of the weights"): the seed recipe on a random-weight SDXL-base
# folder, eager and with --cuda_graph (the average's step captured in the optimizer step's graph), beside the
# same captured run without the average: the written (averaged) LoRA of the eager and captured runs, the raw
# weights, and the steady step time and peak memory the average costs.
#
#   bash tools/gpu/ema_graph.sh [STEPS]   (after scripts/gpu-pack.sh --example train_naruto and .gpu/naruto512,
#                                          as train_graph_compare.sh)
set -uo pipefail
cd "$(dirname "$0")/../.."
steps=${1:-30}
out=${OUT:-/tmp/ema-graph}
source tools/gpu/setup.sh
gpu_setup ema-graph.log
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
run graph --cuda_graph
run ema-eager --use_ema --ema_update_after_step 5
run ema-graph --cuda_graph --use_ema --ema_update_after_step 5
python3 - "$steps" <<'PY'
import json, sys
from safetensors.torch import load_file
steps = sys.argv[1]
def steady(name):
    try:
        rows = [json.loads(l) for l in open(f"/tmp/run-{name}/logs/metrics.jsonl")]
    except OSError:
        return None
    a, b = rows[1], rows[-1]
    return round((b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"]), 4), rows[-1]["peak_memory_gib"]
for name in ["graph", "ema-eager", "ema-graph"]:
    print(name, "steady s/step, peak GiB:", steady(name))
def diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a) / max(b[k].abs().max().item() for k in b)
try:
    lora = {n: load_file(f"/tmp/run-{n}/pytorch_lora_weights.safetensors") for n in ["ema-eager", "ema-graph"]}
    raw = {n: load_file(f"/tmp/run-{n}/checkpoint-{steps}/lora_parameters.safetensors") for n in ["ema-eager", "ema-graph"]}
    print("written (averaged) LoRA, captured vs eager: max |d| / max:", diff(lora["ema-graph"], lora["ema-eager"]))
    print("raw weights, captured vs eager: max |d| / max:", diff(raw["ema-graph"], raw["ema-eager"]))
except Exception as e:  # a failed run leaves files missing
    print("comparison failed:", e)
PY
echo "== done $(date -u +%FT%TZ)"
