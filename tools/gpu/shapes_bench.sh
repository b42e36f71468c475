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
source tools/gpu/seed_bench.sh
seed_bench_data /tmp/shapes-data "$images"
run() {  # NAME FLAGS...
    local name=$1; shift
    seed_bench_run "$name" '^\[trainer\] (LoRA|DoRA|captured|estimated|text encoders|linear layers|convolutions|prediction)|^done|rror' "$steps" --logging_steps 2 "$@"
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
seed_bench_table "$steps" ${RUNS:-$all}
