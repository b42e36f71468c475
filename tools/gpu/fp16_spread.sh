#!/usr/bin/env bash
# Issue 18's fp16 acceptance on the GPU: the seed recipe (512 px, batch 2 x accumulation 2, 8-bit AdamW, LoRA rank 4
# on to_q/to_k/to_v/to_out.0, --cuda_graph) in bf16 and in fp16 (GradScaler inside the captured optimizer step),
# each with SEEDS seeds, on full-size SDXL with random weights and 16 pattern images. Prints each run's mean loss
# over its last third of steps, steady s/step, peak memory and (fp16) the loss-scale history, then whether every
# fp16 run's mean lies within the bf16 runs' range widened by their spread (run-to-run spread: max - min of the
# bf16 means).
#
#   bash tools/gpu/fp16_spread.sh [STEPS] [SEEDS]
#       (after scripts/gpu-pack.sh --example train_naruto; wheels in .whl/)
set -uo pipefail
cd "$(dirname "$0")/../.."
steps=${1:-150} seeds=${2:-3}
out=${OUT:-/tmp/fp16-spread}
source tools/gpu/setup.sh
gpu_setup "fp16-spread.log"
source tools/gpu/seed_bench.sh
seed_bench_data /tmp/spread-data
names=()
for precision in bf16 fp16; do
    for seed in $(seq 0 $((seeds - 1))); do
        name=$precision-seed$seed
        names+=("$name")
        seed_bench_run "$name" '^\[trainer\] (captured|estimated)|^done|rror' "$steps" --logging_steps 1 \
            --seed "$seed" --mixed_precision "$precision"
    done
done
python3 - "$steps" "${names[@]}" <<'PY'
import json, statistics, sys
steps, names = int(sys.argv[1]), sys.argv[2:]
means = {}
print(f"{'run':<14} {'mean loss (last third)':>22} {'s/step':>8} {'peak GiB':>9} {'skipped':>8} {'overflows':>9}")
for name in names:
    try:
        rows = [json.loads(l) for l in open(f"/tmp/run-{name}/logs/metrics.jsonl")]
    except OSError:
        print(f"{name:<14} (no metrics)"); continue
    by_step = {r["step"]: r for r in rows}
    if steps not in by_step:
        print(f"{name:<14} (incomplete: {len(rows)} rows)"); continue
    tail = [r["loss"] for r in rows if r["step"] > steps - steps // 3 and r["loss"] is not None]
    means[name] = statistics.fmean(tail)
    a, b = by_step[steps // 2], by_step[steps]
    per = (b["elapsed_s"] - a["elapsed_s"]) / (steps - steps // 2)
    peak = max(r["peak_memory_gib"] or 0 for r in rows)
    print(f"{name:<14} {means[name]:22.5f} {per:8.4f} {peak:9.2f} {b.get('skipped_steps', 0):>8} {b.get('overflow_steps', '-'):>9}")
    if "loss_scale" in b:
        changes = [(r["step"], r["loss_scale"]) for i, r in enumerate(rows) if i == 0 or r["loss_scale"] != rows[i - 1]["loss_scale"]]
        print(f"{'':<14} loss_scale changes (step, scale): {changes[:12]}")
bf = [v for k, v in means.items() if k.startswith("bf16")]
fp = {k: v for k, v in means.items() if k.startswith("fp16")}
if len(bf) >= 2 and fp:
    spread = max(bf) - min(bf)
    lo, hi = min(bf) - spread, max(bf) + spread
    print(f"bf16 means {min(bf):.5f}..{max(bf):.5f}, spread {spread:.5f}; accepted band {lo:.5f}..{hi:.5f}")
    for k, v in fp.items():
        print(f"{k}: {v:.5f} {'within' if lo <= v <= hi else 'OUTSIDE'} the band (vs bf16 mean {statistics.fmean(bf):+.5f}: {v - statistics.fmean(bf):+.5f})")
PY
echo "== done $(date -u +%FT%TZ)"
