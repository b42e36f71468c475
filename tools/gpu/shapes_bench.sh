#!/usr/bin/env bash
# Issue 17's GPU check: the seed recipe (512 px, batch 2 x accumulation 2, bf16, 8-bit AdamW, LoRA rank 4 on
# to_q/to_k/to_v/to_out.0, --cuda_graph) beside the same recipe with --train_text_encoder, with kohya's default
# UNet targets plus LoCon, and the other adapter shapes, in one GPU-machine run: steady-state time per step and
# peak memory of each (docs/BENCHMARKS.md). The model is full-size SDXL with random weights.
#
#   bash tools/gpu/shapes_bench.sh [STEPS] [IMAGES]
#       (after copying a release train_naruto to .gpu/examples/ and the diffusers wheel to .whl/)
# RUNS picks runs by name (default: the six below; also seed-checkpointed, dora, dropout-checkpointed, rslora). Steady state: the logged wall clock from step STEPS/2 to STEPS.
set -uo pipefail
cd "$(dirname "$0")/../.."
steps=${1:-24} images=${2:-16}
out=${OUT:-/tmp/shapes-bench}
source tools/gpu/setup.sh
gpu_setup "shapes-bench.log"
model=/tmp/sdxl-random
[ -f "$model/unet/config.json" ] || python3 tools/gpu/random_sdxl.py --out "$model" | tail -1
python3 - "$images" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
n, folder = int(sys.argv[1]), Path("/tmp/shapes-data")
folder.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
y, x = np.mgrid[0:512, 0:512]
for i in range(n):
    img = (rng.integers(0, 255, 3)[None, None, :] + 64 * np.sin(x[..., None] / (17 + i) + y[..., None] / (23 + i)))
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"pattern-{i:02d}.png")
print(f"{n} images in {folder}")
PY
log_every=2
run() {  # NAME FLAGS...
    local name=$1; shift
    echo "== train_naruto $name: $*"
    timeout 240 ./.gpu/examples/train_naruto --pretrained_model_name_or_path "$model" --dataset_name /tmp/shapes-data \
        --resolution 512 --train_batch_size 2 --gradient_accumulation_steps 2 --max_train_samples none \
        --instance_prompt "Naruto style anime character" --cuda_graph --max_train_steps "$steps" \
        --logging_steps "$log_every" --checkpointing_steps 100000 --validation_prompt none \
        --output_dir "/tmp/run-$name" "$@" 2>&1 \
        | grep -E "^\[trainer\] (LoRA|DoRA|captured|estimated|text encoders|linear layers|convolutions|prediction)|^done|rror" | cut -c1-400
    cp "/tmp/run-$name/logs/metrics.jsonl" "$out/metrics-$name.jsonl" 2>/dev/null
    ls "/tmp/run-$name" 2>/dev/null | tr '\n' ' '; echo
}
rm -rf /tmp/run-*
all="seed text-encoder kohya-locon text-encoder-kohya-locon-checkpointed-fp8 dora-dropout-checkpointed vpred-ztsnr"
for name in ${RUNS:-$all}; do
    case "$name" in
        seed) run "$name" ;;
        seed-checkpointed) run "$name" --gradient_checkpointing ;;
        dora) run "$name" --use_dora ;;
        dropout-checkpointed) run "$name" --lora_dropout 0.1 --gradient_checkpointing ;;
        text-encoder) run "$name" --train_text_encoder ;;
        kohya-locon) run "$name" --target_modules kohya --conv_rank 4 --conv_alpha 1 ;;
        text-encoder-kohya-locon-checkpointed-fp8)
            run "$name" --train_text_encoder --target_modules kohya --conv_rank 4 --conv_alpha 1 \
                --gradient_checkpointing --fp8_base_weights ;;
        dora-dropout-checkpointed) run "$name" --use_dora --lora_dropout 0.1 --gradient_checkpointing ;;
        vpred-ztsnr) run "$name" --prediction_type v_prediction --zero_terminal_snr ;;
        rslora) run "$name" --use_rslora ;;
    esac
done
python3 - "$steps" ${RUNS:-$all} <<'PY'
import json, sys
steps = int(sys.argv[1])
print(f"{'run':<42} {'s/step':>8} {'vs seed':>8} {'peak GiB':>9} {'final loss':>10}")
seed = None
for name in sys.argv[2:]:
    try:
        rows = {r["step"]: r for r in map(json.loads, open(f"/tmp/run-{name}/logs/metrics.jsonl"))}
    except OSError:
        print(f"{name:<42} (no metrics)"); continue
    a, b = rows.get(steps // 2), rows.get(steps)
    if not (a and b):
        print(f"{name:<42} (incomplete)"); continue
    per = (b["elapsed_s"] - a["elapsed_s"]) / (steps - steps // 2)
    seed = per if name == "seed" else seed
    ratio = f"{per / seed:8.2f}" if seed else f"{'-':>8}"
    peak = max(r["peak_memory_gib"] or 0 for r in rows.values())
    print(f"{name:<42} {per:8.4f} {ratio} {peak:9.2f} {b['loss'] or float('nan'):10.4f}")
PY
