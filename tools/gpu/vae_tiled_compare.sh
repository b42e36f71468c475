#!/usr/bin/env bash
# VAE decode at 2048x2048 in bf16, tiled and untiled, ours beside diffusers in one GPU-machine run, with
# cuDNN's default algorithm choice and with its benchmark mode (docs/BENCHMARKS.md).
#   bash tools/gpu/vae_tiled_compare.sh [default] [benchmark]   (after scripts/gpu-pack.sh --example vae_decode;
#                                                              diffusers wheel in .whl/; both modes when none is named)
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/vae-tiled-compare}
source tools/gpu/setup.sh
gpu_setup vae-tiled-compare.log .whl/diffusers-*.whl .whl/importlib_metadata-*.whl
modes=("$@"); [ ${#modes[@]} -gt 0 ] || modes=(default benchmark)
for mode in "${modes[@]}"; do
    case "$mode" in default) flag="" ;; benchmark) flag="--cudnn-benchmark" ;; *) echo "unknown mode $mode"; exit 2 ;; esac
    echo "== ours ${flag:-default}"
    ./.gpu/examples/vae_decode --size 2048 --kind bf16 $flag 2>&1 | tail -2
    ./.gpu/examples/vae_decode --size 2048 --kind bf16 --untiled $flag 2>&1 | tail -2
    echo "== diffusers ${flag:-default}"
    timeout 120 python3 tools/gpu/reference_sdxl.py --parts vae --out /tmp/sdxl-vae $flag 2>&1 | grep -E '"vae_bf16|cudnn'
done
echo "== done $(date -u +%FT%TZ)"
