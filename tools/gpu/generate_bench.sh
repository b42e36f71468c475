#!/usr/bin/env bash
# Issue 22's timing on one GPU: text to image at 1024x1024, 30 Euler steps, guidance 5 (CFG batch 2), bf16,
# on full-size SDXL-base random weights (tools/gpu/random_sdxl.py):
#  1. the torch-cuda/sdxl-model CUDA test of the graphed denoising loop (tests/pipeline_graph);
#  2. diffusers' StableDiffusionXLPipeline (prompt as embeddings, as tools/gpu/reference_sdxl.py's
#     pipeline part), mean of two after one warm-up;
#  3. ours, `examples/generate --warmup`, eager and with --cuda_graph, interleaved twice.
#
#   CARGO_TARGET_DIR=... scripts/gpu-pack.sh --example generate --test pipeline_graph   (here), then there:
#   bash tools/gpu/generate_bench.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/generate-bench}
source tools/gpu/setup.sh
gpu_setup "generate-bench.log"
model=/tmp/sdxl-random
echo "== tests/pipeline_graph"
bash scripts/gpu-entry.sh tests/pipeline_graph 2>&1 | grep -E "^test |test result|panicked"
[ -f "$model/unet/config.json" ] || python3 tools/gpu/random_sdxl.py --out "$model" | tail -1
# The non-variant names too (our generate reads those).
find "$model" -name "*.fp16.safetensors" | while read -r f; do ln -sf "$(basename "$f")" "${f/.fp16/}"; done
echo "== diffusers StableDiffusionXLPipeline"
python3 - "$model" <<'PY' 2>&1 | grep -v "should be kept in float32"
import sys, time, torch
from pathlib import Path
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection
out, dtype = Path(sys.argv[1]), torch.bfloat16
pipe = StableDiffusionXLPipeline(
    vae=AutoencoderKL.from_pretrained(out / "vae", torch_dtype=dtype),
    text_encoder=CLIPTextModel.from_pretrained(out / "text_encoder", dtype=dtype),
    text_encoder_2=CLIPTextModelWithProjection.from_pretrained(out / "text_encoder_2", dtype=dtype),
    tokenizer=None, tokenizer_2=None,
    unet=UNet2DConditionModel.from_pretrained(out / "unet", torch_dtype=dtype),
    scheduler=EulerDiscreteScheduler.from_pretrained(out / "scheduler")).to("cuda")
pipe.set_progress_bar_config(disable=True)
gen = torch.Generator().manual_seed(4)
embeds = torch.randn(1, 77, 2048, generator=gen).to("cuda", dtype)
pooled = torch.randn(1, 1280, generator=gen).to("cuda", dtype)
def run():
    with torch.no_grad():
        return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=1024, width=1024,
                    num_inference_steps=30, guidance_scale=5.0, output_type="pt").images
run(); torch.cuda.synchronize()
times = []
torch.cuda.reset_peak_memory_stats()
for _ in range(2):
    start = time.perf_counter(); run(); torch.cuda.synchronize(); times.append(time.perf_counter() - start)
print(f"diffusers: {times[0]:.3f} s, {times[1]:.3f} s (mean {sum(times) / 2:.3f} s), peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
PY
for round in a b; do
    for mode in eager graph; do
        flag=""; [ "$mode" = graph ] && flag="--cuda_graph"
        echo "== ours $mode ($round)"
        # shellcheck disable=SC2086
        timeout 300 ./.gpu/examples/generate --model "$model" --prompt "a photo of a cat" --steps 30 --kind bf16 \
            --guidance 5 --warmup $flag --out "$out/cat-$mode-$round.png" 2>&1 | grep -E "warm-up|generate:|rror|wrote"
    done
done
python3 - "$out" <<'PY'
import sys
import numpy as np
from PIL import Image
out = sys.argv[1]
a = np.asarray(Image.open(f"{out}/cat-eager-a.png"), dtype=np.int16)
for name in ("graph-a", "eager-b", "graph-b"):
    b = np.asarray(Image.open(f"{out}/cat-{name}.png"), dtype=np.int16)
    print(f"eager-a vs {name}: {np.count_nonzero(a != b)} of {a.size} channel values differ, largest {np.abs(a - b).max()}")
PY
