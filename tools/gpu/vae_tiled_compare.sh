#!/usr/bin/env bash
# VAE decode at 2048x2048 in bf16, tiled and untiled, ours beside diffusers in one GPU-machine run, with
# cuDNN's default algorithm choice and with its benchmark mode (docs/BENCHMARKS.md).
#   bash tools/gpu/vae_tiled_compare.sh     (after scripts/gpu-pack.sh --example vae_decode; diffusers wheel in .whl/)
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/vae-tiled-compare}
mkdir -p "$out"
exec > >(tee -a "$out/vae-tiled-compare.log") 2>&1
torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/diffusers-*.whl .whl/importlib_metadata-*.whl
export PYTHONPATH=/tmp/site
echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
for flag in "" "--cudnn-benchmark"; do
    echo "== ours ${flag:-default}"
    ./.gpu/examples/vae_decode --size 2048 --kind bf16 $flag 2>&1 | tail -2
    ./.gpu/examples/vae_decode --size 2048 --kind bf16 --untiled $flag 2>&1 | tail -2
    echo "== diffusers ${flag:-default}"
    timeout 120 python3 tools/gpu/reference_sdxl.py --parts vae --out /tmp/sdxl-vae $flag 2>&1 | grep -E '"vae_bf16|cudnn'
done
echo "== done $(date -u +%FT%TZ)"
