#!/usr/bin/env bash
# Issue 18's GPU check of --mixed_precision fp16: the fp16 loss scaler on CUDA (the optim8bit test against
# torch.amp.GradScaler's sequences, bit for bit on the CPU and then on CUDA), the compute capability, and the
# trainer with fp16 eager beside fp16 replayed from CUDA graphs (the scaler's unscale, skip decision and
# update inside the captured optimizer step), with bf16 and fp32 for scale, on a random-weight SDXL-base folder.
#
#   bash tools/gpu/fp16_compare.sh [STEPS]
#       (after scripts/gpu-pack.sh --test grad_scaler --example train_naruto, .gpu/naruto512 and the
#        wheels in .whl/, as train_graph_compare.sh)
# Expected: the same loss_scale / overflow_steps sequence in the eager and the graph run, their final
# LoRAs within the eager-vs-graph difference of the bf16 runs, losses near bf16's.
set -uo pipefail
cd "$(dirname "$0")/../.."
steps=${1:-30}
out=${OUT:-/tmp/fp16-compare}
source tools/gpu/setup.sh
gpu_setup fp16-compare.log
echo "== grad_scaler test (CPU, then CUDA with SDXL_REQUIRE_CUDA=1)"
# Through gpu-entry.sh, which points the test at the carried tests/fixtures (SDXL_FIXTURES).
[ -x .gpu/tests/grad_scaler ] && OUT=$out bash scripts/gpu-entry.sh tests/grad_scaler 2>&1 | grep -E "^test |test result"
python3 -c 'import torch; print("torch capability", torch.cuda.get_device_capability(), "bf16 native", torch.cuda.is_bf16_supported(including_emulation=False))'
model=/tmp/sdxl-random
[ -f "$model/unet/config.json" ] || python3 tools/gpu/random_sdxl.py --out "$model" | tail -1
run() {  # NAME FLAGS...
    local name=$1; shift
    echo "== train_naruto $name: $*"
    timeout 200 ./.gpu/examples/train_naruto --pretrained_model_name_or_path "$model" --dataset_name .gpu/naruto512 \
        --max_train_steps "$steps" --logging_steps 1 --checkpointing_steps "$steps" --validation_prompt none \
        --output_dir "/tmp/run-$name" "$@" 2>&1 | grep -v '^\s*$' | tail -6
    cp "/tmp/run-$name/logs/metrics.jsonl" "$out/metrics-$name.jsonl" 2>/dev/null
}
run fp16-eager --mixed_precision fp16
run fp16-graph --mixed_precision fp16 --cuda_graph
run bf16-eager --mixed_precision bf16
run bf16-graph --mixed_precision bf16 --cuda_graph
run fp32-eager --mixed_precision no
python3 - <<'PY'
import json
def rows(name):
    try:
        return [json.loads(l) for l in open(f"/tmp/run-{name}/logs/metrics.jsonl")]
    except OSError:
        return None
for name in ["fp16-eager", "fp16-graph", "bf16-eager", "bf16-graph", "fp32-eager"]:
    r = rows(name)
    if r is None:
        print(name, "missing")
        continue
    a, b = r[1], r[-1]
    print(name, "steady s/step", round((b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"]), 4),
          "peak GiB", b["peak_memory_gib"], "skipped", b["skipped_steps"])
    print("  losses", [None if x["loss"] is None else round(x["loss"], 5) for x in r])
    if "loss_scale" in b:
        print("  loss_scale", [x["loss_scale"] for x in r], "overflow_steps", b["overflow_steps"])
e, g = rows("fp16-eager"), rows("fp16-graph")
if e and g:
    same = [x.get("loss_scale") for x in e] == [x.get("loss_scale") for x in g]
    print("fp16 eager vs graph: same loss_scale sequence:", same)
PY
python3 tools/gpu/compare_loras.py fp16-eager fp16-graph --label "fp16 final LoRA"
python3 tools/gpu/compare_loras.py bf16-eager bf16-graph fp16-eager --label "bf16 final LoRA"
echo "== done $(date -u +%FT%TZ)"
