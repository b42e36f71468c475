#!/usr/bin/env bash
# The trainer's full-size GPU check, beside diffusers in the same machine run (docs/BENCHMARKS.md):
# a random-weight SDXL-base folder (tools/gpu/random_sdxl.py), the seed recipe with our trainer for
# STEPS optimizer steps, plain and with gradient checkpointing, then diffusers' step with the same
# settings (tools/gpu/reference_train.py: accelerate + peft + bitsandbytes AdamW8bit).
#
#   bash tools/gpu/train_compare.sh [STEPS] [REF_STEPS]     (after scripts/gpu-pack.sh --example train_naruto,
#                                                           the 512 px dataset in .gpu/naruto512, wheels in .whl/)
# Everything it prints goes to $OUT/train-compare.log; metrics and JSON results to $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
steps=${1:-60} ref_steps=${2:-20}
out=${OUT:-/tmp/train-compare}
source tools/gpu/setup.sh
gpu_setup train-compare.log
model=/tmp/sdxl-random
[ -f "$model/unet/config.json" ] || python3 tools/gpu/random_sdxl.py --out "$model"
run() {  # NAME FLAGS...
    local name=$1; shift
    echo "== train_naruto $name: $*"
    /usr/bin/time -f "wall %e s, max RSS %M KiB" ./.gpu/examples/train_naruto \
        --pretrained_model_name_or_path "$model" --dataset_name .gpu/naruto512 --max_train_steps "$steps" \
        --logging_steps 10 --checkpointing_steps "$steps" --output_dir "/tmp/run-$name" "$@" 2>&1 | grep -v '^\s*$' | tail -25
    cp "/tmp/run-$name/logs/metrics.jsonl" "$out/metrics-$name.jsonl" 2>/dev/null
}
run plain --validation_prompt none
run checkpointed --gradient_checkpointing --validation_prompt "Naruto style anime character" --validation_inference_steps 20
cp /tmp/run-checkpointed/base_vs_lora.png "$out/" 2>/dev/null
ls -la /tmp/run-checkpointed
for mode in "" "--checkpointing"; do
    echo "== diffusers reference ${mode:-plain}"
    python3 tools/gpu/reference_train.py --steps "$ref_steps" --warmup 3 --lora-dtype fp32 $mode \
        --json "$out/reference${mode:+-checkpointed}.json" 2>&1 | grep -v Warning | tail -6
done
echo "== done $(date -u +%FT%TZ)"
