#!/usr/bin/env bash
# Issue 22's timing on one GPU: text to image at 1024x1024, 30 Euler steps, guidance 5 (CFG batch 2), bf16,
# on full-size SDXL-base random weights (tools/gpu/random_sdxl.py):
#  1. the torch-cuda/sdxl-model CUDA test of the graphed denoising loop (tests/pipeline_graph);
#  2. diffusers' StableDiffusionXLPipeline through tools/gpu/reference_sdxl.py's pipeline part (prompt as
#     embeddings), mean of two after one warm-up;
#  3. ours, `examples/generate --warmup`, eager and with --cuda_graph, interleaved twice;
#  4. ours with --fp8 (fp8 UNet weights), eager and graphed, and its image against bf16's.
#
#   CARGO_TARGET_DIR=... scripts/gpu-pack.sh --example generate --test pipeline_graph   (here), then there:
#   bash tools/gpu/generate_bench.sh        (ROUNDS=a: one round of 3. instead of two; the test runs only if packed)
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/generate-bench}
source tools/gpu/setup.sh
gpu_setup "generate-bench.log"
model=/tmp/sdxl-random
if [ -x .gpu/tests/pipeline_graph ]; then
    echo "== tests/pipeline_graph"
    bash scripts/gpu-entry.sh tests/pipeline_graph 2>&1 | grep -E "^test |test result|panicked"
fi
[ -f "$model/unet/config.json" ] || python3 tools/gpu/random_sdxl.py --out "$model" | tail -1
# The non-variant names too (our generate reads those).
find "$model" -name "*.fp16.safetensors" | while read -r f; do ln -sf "$(basename "$f")" "${f/.fp16/}"; done
echo "== diffusers StableDiffusionXLPipeline (reference_sdxl.py's pipeline part on the same folder)"
python3 tools/gpu/reference_sdxl.py --out "$model" --parts pipeline 2>&1 \
    | grep -E '"(device|pipeline_1024_30_steps_bf16_s|pipeline_1024_30_steps_bf16_peak_gib)"|rror'
for round in ${ROUNDS:-a b}; do
    for mode in eager graph; do
        flag=""; [ "$mode" = graph ] && flag="--cuda_graph"
        echo "== ours $mode ($round)"
        # shellcheck disable=SC2086
        timeout 300 ./.gpu/examples/generate --model "$model" --prompt "a photo of a cat" --steps 30 --kind bf16 \
            --guidance 5 --warmup $flag --out "$out/cat-$mode-$round.png" 2>&1 | grep -E "warm-up|generate:|rror|wrote"
    done
done
for mode in eager graph; do
    flag=""; [ "$mode" = graph ] && flag="--cuda_graph"
    echo "== ours --fp8 $mode"
    # shellcheck disable=SC2086
    timeout 300 ./.gpu/examples/generate --model "$model" --prompt "a photo of a cat" --steps 30 --kind bf16 \
        --guidance 5 --warmup --fp8 $flag --out "$out/cat-fp8-$mode.png" 2>&1 | grep -E "UNet|warm-up|generate:|rror|wrote"
done
python3 - "$out" <<'PY'
import os
import sys
import numpy as np
from PIL import Image
out = sys.argv[1]
a = np.asarray(Image.open(f"{out}/cat-eager-a.png"), dtype=np.int16)
for name in ("graph-a", "eager-b", "graph-b", "fp8-eager", "fp8-graph"):
    if not os.path.exists(f"{out}/cat-{name}.png"):
        continue
    b = np.asarray(Image.open(f"{out}/cat-{name}.png"), dtype=np.int16)
    print(f"eager-a vs {name}: {np.count_nonzero(a != b)} of {a.size} channel values differ, largest {np.abs(a - b).max()}, mean {np.abs(a - b).mean():.2f}")
PY
