#!/usr/bin/env bash
# Where the seed recipe's step time and memory go, ours beside diffusers in one GPU-machine run
# (docs/BENCHMARKS.md): libtorch's profiler over one optimizer step of our trainer (eager, CUDA graphs,
# eager with gradient checkpointing for the allocation peak) and of diffusers' step (eager and captured),
# each trace summarized by tools/gpu/profile_summary.py; two identical eager runs for the run-to-run spread;
# and one profiled 2048 px tiled VAE decode per attention backend.
#
#   bash tools/gpu/profile_compare.sh     (after scripts/gpu-pack.sh --example train_naruto --example vae_decode,
#                                          the 512 px dataset in .gpu/naruto512 and the wheels in .whl/)
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/profile-compare}
source tools/gpu/setup.sh
gpu_setup profile-compare.log
model=/tmp/sdxl-random
[ -f "$model/unet/config.json" ] || python3 tools/gpu/random_sdxl.py --out "$model" | tail -1
summary() { python3 tools/gpu/profile_summary.py "$@" --top 30; }
if [ -x .gpu/tests/torch_cuda ]; then
    echo "== torch-cuda's own tests on the GPU"
    ./.gpu/tests/torch_cuda 2>&1 | grep -E "^test |test result"
fi
steps=8
run() {  # NAME FLAGS...
    local name=$1; shift
    echo "== train_naruto $name: $*"
    timeout 240 ./.gpu/examples/train_naruto --pretrained_model_name_or_path "$model" --dataset_name .gpu/naruto512 \
        --max_train_steps "$steps" --logging_steps 1 --checkpointing_steps "$steps" --validation_prompt none \
        --output_dir "/tmp/run-$name" "$@" 2>&1 | grep -E "^\[trainer\] (step|captured|estimate)|^done|rror" | cut -c1-400
    for trace in /tmp/run-$name/profile/*.json; do
        [ -f "$trace" ] && summary "$trace" --json "$out/summary-$name.json" && gzip -c "$trace" > "$out/trace-$name.json.gz"
    done
}
run eager --profile_step 3
run eager-again
run graph --cuda_graph --profile_step 5
run graph-checkpointed --cuda_graph --gradient_checkpointing --profile_step 5
run eager-checkpointed --gradient_checkpointing --profile_step 2
python3 tools/gpu/compare_loras.py eager eager-again graph graph-checkpointed eager-checkpointed --label "final LoRA after 8 steps"
echo "== diffusers, eager (script) and captured, one profiled step each"
timeout 300 python3 tools/gpu/reference_train.py --steps 5 --warmup 2 --lora-dtype fp32 --cuda-graph \
    --profile /tmp/ref-profile 2>&1 | grep -E "^reference_train" | cut -c1-400
echo "== diffusers, eager with gradient checkpointing, one profiled step"
timeout 200 python3 tools/gpu/reference_train.py --steps 3 --warmup 2 --lora-dtype fp32 --checkpointing \
    --profile /tmp/ref-profile-ckpt 2>&1 | grep -E "^reference_train" | cut -c1-400
for phase in eager eager_graph_optimizer graph; do
    f=/tmp/ref-profile/diffusers-$phase.json
    [ -f "$f" ] && summary "$f" --json "$out/summary-diffusers-$phase.json" && gzip -c "$f" > "$out/trace-diffusers-$phase.json.gz"
done
f=/tmp/ref-profile-ckpt/diffusers-eager.json
[ -f "$f" ] && summary "$f" --json "$out/summary-diffusers-eager-checkpointed.json"
echo "== VAE decode 2048 px bf16, tiled, per attention backend"
for attention in fused plain sliced; do
    timeout 120 ./.gpu/examples/vae_decode --size 2048 --kind bf16 --runs 3 --attention "$attention" \
        --profile "/tmp/vae-$attention.json" 2>&1 | tail -2
    [ -f "/tmp/vae-$attention.json" ] && summary "/tmp/vae-$attention.json" --json "$out/summary-vae-$attention.json"
done
echo "== done $(date -u +%FT%TZ)"
