# Sourced by the GPU scripts that time variants of the seed recipe against each other (shapes_bench.sh,
# optimizers_bench.sh, fp16_spread.sh), after tools/gpu/setup.sh's gpu_setup:
#   seed_bench_data DIR [IMAGES]   the random-weight SDXL-base folder at /tmp/sdxl-random (made once) and
#                                  IMAGES (default 16) 512 px pattern images in DIR
#   seed_bench_run NAME FILTER STEPS FLAGS...
#                                  train_naruto on them: 512 px, batch 2 x accumulation 2, --cuda_graph, STEPS
#                                  steps, output in /tmp/run-NAME, its metrics copied to $out; prints the log
#                                  (SEED_BENCH_LAUNCH: a command line to start it with, e.g. torchrun's;
#                                  SEED_BENCH_BINARY: another example of .gpu/examples, e.g. a build from
#                                  before a change)
#                                  lines matching the extended regex FILTER and the output's files
#   seed_bench_table STEPS NAME... each run's steady s/step (logged wall clock from step STEPS/2 to STEPS),
#                                  against the run named `seed`, peak memory, final loss, and the model
#                                  FLOP/s and MFU at that steady step (the step's FLOPs and the GPU's peak
#                                  from the trainer's `throughput` line)
seed_bench_model=/tmp/sdxl-random

seed_bench_data() {
    local folder=$1 images=${2:-16}
    [ -f "$seed_bench_model/unet/config.json" ] || python3 tools/gpu/random_sdxl.py --out "$seed_bench_model" | tail -1
    python3 - "$images" "$folder" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
n, folder = int(sys.argv[1]), Path(sys.argv[2])
folder.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
y, x = np.mgrid[0:512, 0:512]
for i in range(n):
    img = (rng.integers(0, 255, 3)[None, None, :] + 64 * np.sin(x[..., None] / (17 + i) + y[..., None] / (23 + i)))
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"pattern-{i:02d}.png")
print(f"{n} images in {folder}")
PY
    seed_bench_folder=$folder
}

seed_bench_run() {  # NAME FILTER STEPS FLAGS...
    local name=$1 filter=$2 steps=$3; shift 3
    echo "== ${SEED_BENCH_BINARY:-train_naruto} $name: $*"
    # SEED_BENCH_LAUNCH: a launcher to start it with (e.g. torchrun --no-python), word-split.
    # shellcheck disable=SC2086
    timeout 240 ${SEED_BENCH_LAUNCH:-} "./.gpu/examples/${SEED_BENCH_BINARY:-train_naruto}" --pretrained_model_name_or_path "$seed_bench_model" \
        --dataset_name "$seed_bench_folder" --resolution 512 --train_batch_size 2 --gradient_accumulation_steps 2 \
        --max_train_samples none --instance_prompt "Naruto style anime character" --cuda_graph \
        --max_train_steps "$steps" --checkpointing_steps 100000 --validation_prompt none \
        --output_dir "/tmp/run-$name" "$@" 2>&1 | tee "/tmp/log-$name.txt" | grep -E "$filter|^\[trainer\] throughput" | cut -c1-400
    cp "/tmp/run-$name/logs/metrics.jsonl" "$out/metrics-$name.jsonl" 2>/dev/null
    ls "/tmp/run-$name" 2>/dev/null | tr '\n' ' '; echo
}

seed_bench_table() {  # STEPS NAME...
    python3 - "$@" <<'PY'
import json, sys
steps = int(sys.argv[1])
import re
print(f"{'run':<42} {'s/step':>8} {'vs seed':>8} {'peak GiB':>9} {'final loss':>10} {'TFLOP/s':>8} {'MFU':>6}")
seed = None
def flops(name):
    # The trainer's throughput line: the step's model FLOPs and the GPU's peak, if it knows it.
    try:
        text = open(f"/tmp/log-{name}.txt").read()
    except OSError:
        return None, None
    step = re.search(r"([0-9.]+) TFLOP per step", text)
    peak = re.search(r"'s ([0-9.]+) TFLOP/s dense bf16", text)
    return (float(step.group(1)) if step else None), (float(peak.group(1)) if peak else None)
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
    step_tflop, peak_tflops = flops(name)
    rate = f"{step_tflop / per:8.1f}" if step_tflop else f"{'-':>8}"
    mfu = f"{100 * step_tflop / per / peak_tflops:5.1f}%" if step_tflop and peak_tflops else f"{'-':>6}"
    print(f"{name:<42} {per:8.4f} {ratio} {peak:9.2f} {b['loss'] or float('nan'):10.4f} {rate} {mfu}")
PY
}
