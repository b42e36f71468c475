#!/usr/bin/env bash
# The seed-recipe benchmark of issue 10, ours beside diffusers in one GPU-machine run (docs/BENCHMARKS.md):
# our trainer in the modes MODES names (default: eager, CUDA graphs, graphs + gradient checkpointing, graphs +
# checkpointing + fp8 base weights; names are eager|graph, optionally -checkpointed, -fp8, -cudnn); then diffusers' step (accelerate + peft + bnb AdamW8bit,
# eager) and the same step by hand, eager and captured whole as a CUDA graph (torch fused AdamW). Prints
# steady-state step time, images/s, peak memory, the ratios, and how far each run's LoRA is from the eager one.
#
#   bash tools/gpu/train_bench.sh [STEPS] [REF_STEPS] [RESOLUTION] [BATCH] [ACCUM] [EXTRA_REF_FLAGS...]
#       (after scripts/gpu-pack.sh --example train_naruto, .gpu/naruto<RESOLUTION> from tools/demo/make_dataset.py
#        and the wheels in .whl/)
# With RESOLUTION 1024 the default mode is graph-checkpointed, as the 1024 px target asks, and diffusers runs eager
# with checkpointing only unless EXTRA_REF_FLAGS add --cuda-graph. Steady state: from step STEPS/2 to STEPS (the logged wall clock);
# step STEPS/2-2 is timed alone (host vs device) and STEPS/2-1 recorded by the profiler, before that window.
set -uo pipefail
cd "$(dirname "$0")/../.."
steps=${1:-24} ref_steps=${2:-10} res=${3:-512} batch=${4:-2} accum=${5:-2}
shift $(( $# < 5 ? $# : 5 ))
out=${OUT:-/tmp/train-bench}
source tools/gpu/setup.sh
gpu_setup "train-bench-$res.log"
model=/tmp/sdxl-random
[ -f "$model/unet/config.json" ] || python3 tools/gpu/random_sdxl.py --out "$model" | tail -1
log_every=2
probe=$(( steps / 2 - 2 ))
run() {  # NAME FLAGS...
    local name=$1; shift
    echo "== train_naruto $name: $*"
    timeout 240 ./.gpu/examples/train_naruto --pretrained_model_name_or_path "$model" --dataset_name ".gpu/naruto$res" \
        --resolution "$res" --train_batch_size "$batch" --gradient_accumulation_steps "$accum" \
        --max_train_steps "$steps" --logging_steps "$log_every" --checkpointing_steps "$steps" --validation_prompt none \
        --output_dir "/tmp/run-$name" "$@" 2>&1 | grep -E "^\[trainer\] (step|captured|estimated)|^done|rror" | cut -c1-300
    cp "/tmp/run-$name/logs/metrics.jsonl" "$out/metrics-$res-$name.jsonl" 2>/dev/null
    for trace in /tmp/run-$name/profile/*.json; do
        [ -f "$trace" ] && python3 tools/gpu/profile_summary.py "$trace" --top 20 --json "$out/summary-$res-$name.json" | head -40
    done
}
rm -rf /tmp/run-*
# Modes by name: eager | graph, then -checkpointed, then -fp8, then -cudnn (cuDNN benchmark mode),
# e.g. graph-checkpointed-fp8.
default_modes="eager graph graph-checkpointed graph-checkpointed-fp8"
[ "$res" = 512 ] || default_modes="graph-checkpointed"
for name in ${MODES:-$default_modes}; do
    flags=()
    case "$name" in graph*) flags+=(--cuda_graph --profile_step "$probe") ;; esac
    case "$name" in *checkpointed*) flags+=(--gradient_checkpointing) ;; esac
    case "$name" in *fp8*) flags+=(--fp8_base_weights) ;; esac
    case "$name" in *cudnn*) flags+=(--cudnn_benchmark) ;; esac
    run "$name" "${flags[@]}"
done
[ "$res" = 512 ] && ref_flags=(--cuda-graph) || ref_flags=(--checkpointing)
python3 - "$steps" "$log_every" <<'PY'
import glob, json, sys
steps, every = int(sys.argv[1]), int(sys.argv[2])
def steady(name):
    try:
        rows = {r["step"]: r for r in map(json.loads, open(f"/tmp/run-{name}/logs/metrics.jsonl"))}
    except OSError:
        return None
    # From the middle (after warm-up, capture and the profiled step) to the end.
    a, b = rows.get(steps // 2), rows.get(steps)
    if not a or not b:
        return None
    return (b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"]), b["peak_memory_gib"], round(b["loss"], 5)
names = sorted(p.split("/run-")[1] for p in glob.glob("/tmp/run-*") if "/tmp/run-" in p)
for name in names:
    print(f"ours {name}: steady s/step, peak GiB, last loss: {steady(name)}")
PY
runs=$(cd /tmp && ls -d run-* 2>/dev/null | sed 's/^run-//')
base=$(for n in eager eager-checkpointed; do echo "$runs" | grep -qx "$n" && { echo "$n"; break; }; done)
others=$(echo "$runs" | grep -vx "${base:-none}")
[ -n "$base" ] && [ -n "$others" ] && python3 tools/gpu/compare_loras.py "$base" $others --label "final LoRA after $steps steps"
echo "== diffusers ${ref_flags[*]}"
timeout 300 python3 tools/gpu/reference_train.py --steps "$ref_steps" --warmup 3 --lora-dtype fp32 \
    --resolution "$res" --batch "$batch" --accum "$accum" "${ref_flags[@]}" "$@" --json "$out/reference-$res.json" 2>&1 \
    | grep -E "^reference_train" | cut -c1-420
echo "== done $(date -u +%FT%TZ)"
