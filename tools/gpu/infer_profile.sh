#!/usr/bin/env bash
# Where the time of one inference step goes (issue 22's ≤ 1.0 s per image; docs/BENCHMARKS.md): the full-size
# SDXL-base UNet (random weights) in bf16, 1024 px, batch 2 as with classifier-free guidance, timed NCHW and
# channels-last by examples/unet_sdxl, then one more channels-last step recorded with libtorch's profiler and
# summarized by tools/gpu/profile_summary.py (device time by category, top kernels).
#
#   bash tools/gpu/infer_profile.sh [STEPS]
#       (.gpu/examples/unet_sdxl.xz: a stripped, xz-compressed release binary)
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/infer-profile}
source tools/gpu/setup.sh
gpu_setup infer-profile.log
for packed in .gpu/examples/unet_sdxl.xz; do
    [ -f "$packed" ] && xz -d -k -f "$packed" && chmod +x "${packed%.xz}"
done
timeout 300 ./.gpu/examples/unet_sdxl --ref /nonexistent --steps "${1:-10}" --profile /tmp/unet-step.json 2>&1 \
    | grep -E "per UNet step|profile|rror"
python3 tools/gpu/profile_summary.py /tmp/unet-step.json --top 40 --json "$out/unet-step-summary.json"
