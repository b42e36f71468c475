#!/usr/bin/env bash
# `--train_text_encoder` at full size (docs/BENCHMARKS.md): the seed recipe (512 px, batch 2 x accumulation 2,
# bf16, 8-bit AdamW, rank 4) on a random-weight SDXL-base folder, the UNet-only step beside the step that also
# trains both text encoders (eager, CUDA graphs, CUDA graphs with gradient checkpointing): steady seconds per
# optimizer step, peak allocated memory, and the trainer's own estimate of each.
#
#   bash tools/gpu/text_encoder_sdxl.sh [STEPS]   (after scripts/gpu-pack.sh --example train_naruto and the
#                                                 diffusers wheel in .whl/, docs/GPU.md)
set -uo pipefail
cd "$(dirname "$0")/../.."
steps=${1:-20}
out=${OUT:-/tmp/text-encoder-sdxl}
source tools/gpu/setup.sh
gpu_setup text-encoder-sdxl.log
model=/tmp/sdxl-random
[ -f "$model/unet/config.json" ] || python3 tools/gpu/random_sdxl.py --out "$model" | tail -1
run() {  # NAME FLAGS...
    local name=$1; shift
    echo "== train_naruto $name: $*"
    timeout 240 ./.gpu/examples/train_naruto --pretrained_model_name_or_path "$model" \
        --dataset_name examples/data/tiny-naruto --max_train_samples none --max_train_steps "$steps" \
        --logging_steps 1 --checkpointing_steps 1000 --validation_prompt none --output_dir "/tmp/run-$name" "$@" 2>&1 \
        | grep -E "estimated|text encoders|captured|done:|error" | tail -5
}
run unet-graph --cuda_graph
run te-eager --train_text_encoder
run te-graph --train_text_encoder --cuda_graph
run te-graph-checkpointed --train_text_encoder --cuda_graph --gradient_checkpointing
python3 - <<'PY'
import json
for name in ["unet-graph", "te-eager", "te-graph", "te-graph-checkpointed"]:
    try:
        rows = [json.loads(l) for l in open(f"/tmp/run-{name}/logs/metrics.jsonl")]
    except OSError:
        print(name, "no metrics")
        continue
    a, b = rows[4], rows[-1]
    steady = (b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"])
    print(f"{name}: steady s/step {steady:.4f}, peak GiB {rows[-1]['peak_memory_gib']:.2f}, "
          f"loss first/last {rows[0]['loss']:.4f}/{rows[-1]['loss']:.4f}")
PY
echo "== done $(date -u +%FT%TZ)"
