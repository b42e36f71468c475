#!/usr/bin/env bash
# Issue 18's GPU check: the seed recipe (512 px, batch 2 x accumulation 2, bf16, LoRA rank 4 on to_q/to_k/to_v/to_out.0,
# --cuda_graph) with each --optimizer (AdamW8bit, the default, beside AdamW, Prodigy, Adafactor with and without its
# relative step, Lion), and the seed and Prodigy again with --mixed_precision fp16 against bf16: steady-state time
# per step and peak memory of each (docs/BENCHMARKS.md), and the trainer's per-optimizer state table. The model is
# full-size SDXL with random weights. Every run captures its optimizer step in the CUDA graph (a run whose step
# read the host would fail the capture).
#
#   bash tools/gpu/optimizers_bench.sh [STEPS] [IMAGES]
#       (after copying a release train_naruto to .gpu/examples/ and the diffusers wheel to .whl/)
# RUNS picks runs by name (default: all below). Steady state: the logged wall clock from step STEPS/2 to STEPS.
set -uo pipefail
cd "$(dirname "$0")/../.."
steps=${1:-24} images=${2:-16}
out=${OUT:-/tmp/optimizers-bench}
source tools/gpu/setup.sh
gpu_setup "optimizers-bench.log"
model=/tmp/sdxl-random
[ -f "$model/unet/config.json" ] || python3 tools/gpu/random_sdxl.py --out "$model" | tail -1
python3 - "$images" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
n, folder = int(sys.argv[1]), Path("/tmp/optimizers-data")
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
    timeout 240 ./.gpu/examples/train_naruto --pretrained_model_name_or_path "$model" --dataset_name /tmp/optimizers-data \
        --resolution 512 --train_batch_size 2 --gradient_accumulation_steps 2 --max_train_samples none \
        --instance_prompt "Naruto style anime character" --cuda_graph --max_train_steps "$steps" \
        --logging_steps "$log_every" --checkpointing_steps 100000 --validation_prompt none \
        --output_dir "/tmp/run-$name" "$@" 2>&1 \
        | grep -E "^\[trainer\] (LoRA|captured|estimated|optimizer state|Prodigy|Adafactor|--)|^ +[* ] [A-Za-z0-9]+ |^done|rror" | cut -c1-400
    cp "/tmp/run-$name/logs/metrics.jsonl" "$out/metrics-$name.jsonl" 2>/dev/null
    ls "/tmp/run-$name" 2>/dev/null | tr '\n' ' '; echo
}
rm -rf /tmp/run-*
all="seed adamw prodigy adafactor adafactor-fixed lion lion8bit seed-fp16 prodigy-fp16"
for name in ${RUNS:-$all}; do
    case "$name" in
        seed) run "$name" --optimizer AdamW8bit ;;
        adamw) run "$name" --optimizer AdamW ;;
        prodigy) run "$name" --optimizer prodigy --learning_rate 1.0 ;;
        adafactor) run "$name" --optimizer adafactor ;;
        adafactor-fixed)
            run "$name" --optimizer adafactor --adafactor_relative_step false --adafactor_scale_parameter false \
                --adafactor_warmup_init false ;;
        lion) run "$name" --optimizer lion --learning_rate 3e-5 ;;
        lion8bit) run "$name" --optimizer lion8bit --learning_rate 3e-5 ;;
        # --mixed_precision fp16 comes with the fp16 helper's branch (GradScaler); bf16 is the seed.
        seed-fp16) run "$name" --optimizer AdamW8bit --mixed_precision fp16 ;;
        prodigy-fp16) run "$name" --optimizer prodigy --learning_rate 1.0 --mixed_precision fp16 ;;
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
