#!/usr/bin/env bash
# Issue 18's GPU check: the seed recipe (512 px, batch 2 x accumulation 2, bf16, LoRA rank 4 on to_q/to_k/to_v/to_out.0,
# --cuda_graph) with each --optimizer (AdamW8bit, the default, beside AdamW, Prodigy, Adafactor with and without its
# relative step, Lion, Lion8bit), and the seed and Prodigy again with --mixed_precision fp16 against bf16: steady-state time
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
source tools/gpu/seed_bench.sh
seed_bench_data /tmp/optimizers-data "$images"
run() {  # NAME FLAGS...
    local name=$1; shift
    seed_bench_run "$name" '^\[trainer\] (LoRA|captured|estimated|optimizer state|Prodigy|Adafactor|--)|^ +[* ] [A-Za-z0-9]+ |^done|rror' "$steps" --logging_steps 2 "$@"
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
        seed-fp16) run "$name" --optimizer AdamW8bit --mixed_precision fp16 ;;
        prodigy-fp16) run "$name" --optimizer prodigy --learning_rate 1.0 --mixed_precision fp16 ;;
    esac
done
seed_bench_table "$steps" ${RUNS:-$all}
