#!/usr/bin/env bash
# `--train_text_encoder` on the GPU (docs/BENCHMARKS.md): the tiny preset in bf16, eager and replayed as
# CUDA graphs, each plain and with gradient checkpointing; the losses, steady seconds per step and peak memory
# of each, and how far each captured run's final LoRA (UNet and both text encoders) is from its eager twin's.
#
#   bash tools/gpu/text_encoder_graph.sh [STEPS]   (after scripts/gpu-pack.sh --example train_naruto)
set -uo pipefail
cd "$(dirname "$0")/../.."
steps=${1:-12}
out=${OUT:-/tmp/text-encoder-graph}
mkdir -p "$out"
exec > >(tee -a "$out/text-encoder-graph.log") 2>&1
torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null)"
run() {  # NAME FLAGS...
    local name=$1; shift
    echo "== train_naruto $name: $*"
    rm -rf "/tmp/run-$name"
    timeout 200 ./.gpu/examples/train_naruto --preset tiny --pretrained_model_name_or_path tests/fixtures/tiny-sdxl \
        --dataset_name examples/data/tiny-naruto --device cuda --mixed_precision bf16 \
        --max_train_steps "$steps" --logging_steps 1 --checkpointing_steps "$steps" --validation_prompt none \
        --train_text_encoder --text_encoder_lr 1e-3 --output_dir "/tmp/run-$name" "$@" 2>&1 \
        | grep -v '^\s*$' | grep -iv "it/s\]" | tail -12
}
run eager
run graph --cuda_graph
run eager-checkpointed --gradient_checkpointing
run graph-checkpointed --cuda_graph --gradient_checkpointing
python3 - <<'PY'
import json
for name in ["eager", "graph", "eager-checkpointed", "graph-checkpointed"]:
    try:
        rows = [json.loads(l) for l in open(f"/tmp/run-{name}/logs/metrics.jsonl")]
    except OSError:
        print(name, "no metrics")
        continue
    a, b = rows[3], rows[-1]
    steady = (b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"])
    print(name, f"steady s/step {steady:.4f}, peak GiB {rows[-1]['peak_memory_gib']}, losses",
          [round(r["loss"], 5) for r in rows])
PY
python3 tools/gpu/compare_loras.py eager graph --label "final LoRA"
python3 tools/gpu/compare_loras.py eager-checkpointed graph-checkpointed --label "final LoRA"
python3 tools/gpu/compare_loras.py eager eager-checkpointed --label "final LoRA"
python3 - <<'PY'
from safetensors.torch import load_file
p = load_file(next(iter(__import__("glob").glob("/tmp/run-graph/checkpoint-*/lora_parameters.safetensors"))))
te = [k for k in p if k.startswith("text_encoder")]
print(f"graph run: {len(te)} text-encoder LoRA tensors; lora_B max |.|:",
      max(p[k].abs().max().item() for k in te if k.endswith("lora_B")))
PY
echo "== done $(date -u +%FT%TZ)"
