#!/usr/bin/env bash
# Issue 21's figures on one GPU, with the trainer's own FLOP count (crates/trainer/src/throughput.rs):
#  1. the seed recipe (512 px, batch 2 x accumulation 2, bf16, 8-bit AdamW, LoRA rank 4, --cuda_graph) for 80
#     steps, without and with --gradient_checkpointing: steady s/step, model TFLOP/s and MFU;
#  2. the whole seed run as a user starts it: 1,200 steps on 75 images, validation images every 200 steps
#     and the base-vs-LoRA comparison at the end, timed from the command's start to its exit (loading,
#     caching, training, outputs).
# Random full-size SDXL weights (tools/gpu/random_sdxl.py) and generated 512 px pictures stand in for the
# hub's model and the Naruto dataset (no network there).
#
#   CARGO_TARGET_DIR=... scripts/gpu-pack.sh --example train_naruto   (here), then on the GPU machine:
#   bash tools/gpu/mfu_bench.sh [STEPS]
set -uo pipefail
cd "$(dirname "$0")/../.."
steps=${1:-80}
out=${OUT:-/tmp/mfu-bench}
source tools/gpu/setup.sh
gpu_setup "mfu-bench.log"
source tools/gpu/seed_bench.sh
seed_bench_data /tmp/mfu-data 75
filter='^\[trainer\] captured|^done|rror'
seed_bench_run seed "$filter" "$steps" --logging_steps 2
seed_bench_run checkpointing "$filter" "$steps" --logging_steps 2 --gradient_checkpointing
seed_bench_table "$steps" seed checkpointing
echo "== the whole seed run: 1200 steps, 75 images, --cuda_graph, validation every 200 steps, outputs"
rm -rf /tmp/run-full
start=$(date +%s.%N)
timeout 420 ./.gpu/examples/train_naruto --pretrained_model_name_or_path "$seed_bench_model" \
    --dataset_name /tmp/mfu-data --instance_prompt "Naruto style anime character" --cuda_graph \
    --validation_prompt "Naruto style anime character" --output_dir /tmp/run-full 2>&1 \
    | grep -E '^\[trainer\] (model|captured|throughput|cach|encod)|^done|rror' | cut -c1-300
rc=${PIPESTATUS[0]}
end=$(date +%s.%N)
echo "whole run: exit $rc, $(python3 -c "print(f'{$end - $start:.1f}')") s from start to exit"
ls /tmp/run-full | tr '\n' ' '; echo
cp /tmp/run-full/logs/metrics.jsonl "$out/metrics-full.jsonl" 2>/dev/null
