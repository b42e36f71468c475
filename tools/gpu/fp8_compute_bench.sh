#!/usr/bin/env bash
# fp8 products at inference (issues 21 and 22; docs/BENCHMARKS.md): text to image at 1024x1024, 30 Euler
# steps, guidance 5, bf16, --cuda_graph --channels_last, on full-size SDXL-base random weights
# (tools/gpu/random_sdxl.py): bf16 weights, fp8 weights widened (--fp8), fp8 weights multiplied in fp8
# (--fp8 --fp8_compute), and bf16 and fp8 products with flash attention or cuDNN's tried first
# (--attention flash|cudnn), interleaved over ROUNDS (MODES picks them); then each image against the
# first bf16 one.
#
#   bash tools/gpu/fp8_compute_bench.sh
#       (.gpu/examples/generate.xz: a stripped, xz-compressed release binary; the diffusers wheel in .whl/)
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/fp8-compute-bench}
source tools/gpu/setup.sh
gpu_setup fp8-compute-bench.log
for packed in .gpu/examples/generate.xz; do
    [ -f "$packed" ] && xz -d -k -f "$packed" && chmod +x "${packed%.xz}"
done
model=/tmp/sdxl-random
[ -f "$model/unet/config.json" ] || python3 tools/gpu/random_sdxl.py --out "$model" | tail -1
find "$model" -name "*.fp16.safetensors" | while read -r f; do ln -sf "$(basename "$f")" "${f/.fp16/}"; done
for round in ${ROUNDS:-a}; do
    for mode in ${MODES:-bf16 flash cudnn fp8 fp8c fp8c-cudnn}; do
        case "$mode" in
            bf16) flags="" ;;
            flash) flags="--attention flash" ;;
            cudnn) flags="--attention cudnn" ;;
            fp8) flags="--fp8" ;;
            fp8c) flags="--fp8 --fp8_compute" ;;
            fp8c-cudnn) flags="--fp8 --fp8_compute --attention cudnn" ;;
            *) echo "fp8_compute_bench: unknown mode '$mode'" >&2; exit 2 ;;
        esac
        echo "== generate --cuda_graph --channels_last $flags ($round)"
        # shellcheck disable=SC2086
        timeout 200 ./.gpu/examples/generate --model "$model" --prompt "a photo of a cat" --steps 30 --kind bf16 \
            --guidance 5 --warmup --cuda_graph --channels_last $flags --out "$out/cat-$mode-$round.png" 2>&1 \
            | grep -E "UNet|warm-up|generate:|rror|wrote"
    done
done
python3 - "$out" <<'PY'
import glob
import os
import sys
import numpy as np
from PIL import Image
out = sys.argv[1]
first = sorted(glob.glob(f"{out}/cat-bf16-*.png"))[0]
a = np.asarray(Image.open(first), dtype=np.int16)
for path in sorted(glob.glob(f"{out}/cat-*.png")):
    if path == first:
        continue
    b = np.asarray(Image.open(path), dtype=np.int16)
    print(f"{os.path.basename(first)} vs {os.path.basename(path)}: {np.count_nonzero(a != b)} of {a.size} channel values differ, largest {np.abs(a - b).max()}, mean {np.abs(a - b).mean():.2f}")
PY
