#!/usr/bin/env bash
# Issue 16's GPU check: the trainer on a 3-bucket dataset (1024x1024, 832x1216, 1216x832 images at 1024 px
# area) with --cuda_graph, beside the square-only run of the same images, and each bucket alone (its time per
# step and peak memory), in one GPU-machine run (docs/BENCHMARKS.md).
#
#   bash tools/gpu/bucket_bench.sh [STEPS] [IMAGES_PER_BUCKET]
#       (after copying a release train_naruto to .gpu/examples/ and the diffusers wheel to .whl/)
# Steady state: the logged wall clock from step STEPS/2 to STEPS.
set -uo pipefail
cd "$(dirname "$0")/../.."
steps=${1:-24} per_bucket=${2:-8}
out=${OUT:-/tmp/bucket-bench}
source tools/gpu/setup.sh
gpu_setup "bucket-bench.log"
model=/tmp/sdxl-random
[ -f "$model/unet/config.json" ] || python3 tools/gpu/random_sdxl.py --out "$model" | tail -1
python3 - "$per_bucket" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
n = int(sys.argv[1])
rng = np.random.default_rng(0)
sizes = {"square": (1024, 1024), "portrait": (832, 1216), "landscape": (1216, 832)}
for name, (w, h) in sizes.items():
    for folder in (Path("/tmp/buckets/mixed"), Path(f"/tmp/buckets/{name}")):
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            y, x = np.mgrid[0:h, 0:w]
            base = rng.integers(0, 255, 3)
            img = (base[None, None, :] + 64 * np.sin(x[..., None] / (17 + i) + y[..., None] / (23 + i))).clip(0, 255)
            Image.fromarray(img.astype(np.uint8)).save(folder / f"{name}-{i:02d}.png")
print("datasets in /tmp/buckets:", sorted(p.name for p in Path("/tmp/buckets").iterdir()))
PY
log_every=2
run() {  # NAME DATASET FLAGS...
    local name=$1 data=$2; shift 2
    echo "== train_naruto $name ($data): $*"
    timeout 200 ./.gpu/examples/train_naruto --pretrained_model_name_or_path "$model" --dataset_name "$data" \
        --resolution 1024 --train_batch_size 2 --gradient_accumulation_steps 2 --max_train_samples none \
        --instance_prompt "a photo of a pattern" --cuda_graph --max_train_steps "$steps" --logging_steps "$log_every" \
        --checkpointing_steps 100000 --validation_prompt none --output_dir "/tmp/run-$name" "$@" 2>&1 \
        | grep -E "^\[trainer\] ([0-9]+ images|captured|estimated|latents)|^done|rror" | cut -c1-600
    cp "/tmp/run-$name/logs/metrics.jsonl" "$out/metrics-$name.jsonl" 2>/dev/null
}
rm -rf /tmp/run-*
buckets=(--enable_bucket --min_bucket_reso 512 --max_bucket_reso 2048)
# RUNS picks runs by name (default: all): square-only, three-buckets, bucket-{square,portrait,landscape},
# and each with -checkpointed (--gradient_checkpointing).
all="square-only three-buckets bucket-square bucket-portrait bucket-landscape"
for name in ${RUNS:-$all}; do
    flags=()
    case "$name" in *-checkpointed) flags+=(--gradient_checkpointing) ;; esac
    base=${name%-checkpointed}
    case "$base" in
        square-only) run "$name" /tmp/buckets/mixed "${flags[@]}" ;;
        three-buckets) run "$name" /tmp/buckets/mixed "${buckets[@]}" "${flags[@]}" ;;
        bucket-*) run "$name" "/tmp/buckets/${base#bucket-}" "${buckets[@]}" "${flags[@]}" ;;
    esac
done
python3 - "$steps" ${RUNS:-$all} <<'PY'
import json, sys
steps = int(sys.argv[1])
print(f"{'run':<20} {'s/step':>8} {'images/s':>9} {'peak GiB':>9} {'final loss':>10}")
for name in sys.argv[2:]:
    try:
        rows = {r["step"]: r for r in map(json.loads, open(f"/tmp/run-{name}/logs/metrics.jsonl"))}
    except OSError:
        print(f"{name:<20} (no metrics)"); continue
    a, b = rows.get(steps // 2), rows.get(steps)
    if not (a and b):
        print(f"{name:<20} (incomplete)"); continue
    per = (b["elapsed_s"] - a["elapsed_s"]) / (steps - steps // 2)
    peak = max(r["peak_memory_gib"] or 0 for r in rows.values())
    print(f"{name:<20} {per:8.4f} {4 / per:9.2f} {peak:9.2f} {b['loss'] or float('nan'):10.4f}")
PY
