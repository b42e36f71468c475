#!/usr/bin/env bash
# Channels-last UNet at inference (issues 21 and 22; docs/BENCHMARKS.md): parity of the full-size bf16
# UNet with diffusers (NCHW and channels-last beside diffusers' own bf16-vs-fp32 spread) and its time per
# 1024 px CFG step in both layouts (examples/unet_sdxl); then text to image at 1024 px, 30 Euler steps,
# guidance 5, bf16, graphed, NCHW and --channels_last interleaved, and the images against each other.
#
#   bash tools/gpu/channels_last_infer.sh
#       (.gpu/examples/{unet_sdxl,generate}.xz: stripped, xz-compressed release binaries; the diffusers
#        wheel in .whl/)
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/channels-last-infer}
source tools/gpu/setup.sh
gpu_setup channels-last-infer.log
trap gpu_bundle EXIT  # metrics, summaries and images into $out/results.tgz
for packed in .gpu/examples/*.xz .gpu/tests/*.xz; do
    [ -f "$packed" ] && xz -d -k -f "$packed" && chmod +x "${packed%.xz}"
done
ref=/tmp/sdxl-ref
echo "== diffusers UNet reference (reference_sdxl.py --parts unet)"
python3 tools/gpu/reference_sdxl.py --out "$ref" --parts unet 2>&1 | grep -E '"(device|unet_[a-z0-9_]*)"|rror' | cut -c1-200
echo "== ours: examples/unet_sdxl --ref"
timeout 300 ./.gpu/examples/unet_sdxl --ref "$ref" --steps 10 2>&1 | grep -E "rel error|per UNet step|rror"
model=/tmp/sdxl-random
[ -f "$model/unet/config.json" ] || python3 tools/gpu/random_sdxl.py --out "$model" | tail -1
find "$model" -name "*.fp16.safetensors" | while read -r f; do ln -sf "$(basename "$f")" "${f/.fp16/}"; done
for round in a b; do
    for layout in nchw cl; do
        flag=""; [ "$layout" = cl ] && flag="--channels_last"
        echo "== generate --cuda_graph $layout ($round)"
        # shellcheck disable=SC2086
        timeout 200 ./.gpu/examples/generate --model "$model" --prompt "a photo of a cat" --steps 30 --kind bf16 \
            --guidance 5 --warmup --cuda_graph $flag --out "$out/cat-$layout-$round.png" 2>&1 | grep -E "warm-up|generate:|rror|wrote"
    done
done
python3 - "$out" <<'PY'
import sys
import numpy as np
from PIL import Image
out = sys.argv[1]
a = np.asarray(Image.open(f"{out}/cat-nchw-a.png"), dtype=np.int16)
for name in ("nchw-b", "cl-a", "cl-b"):
    try:
        b = np.asarray(Image.open(f"{out}/cat-{name}.png"), dtype=np.int16)
    except OSError:
        continue
    print(f"nchw-a vs {name}: {np.count_nonzero(a != b)} of {a.size} channel values differ, largest {np.abs(a - b).max()}, mean {np.abs(a - b).mean():.2f}")
PY
