#!/usr/bin/env bash
# Lion8bit on the GPU machine: generates bitsandbytes' CUDA-kernel fixture (`gen_bnb_lion8bit_cuda`, needs the
# trimmed bitsandbytes wheel in .whl/, docs/GPU.md), then runs `tests/bnb_lion8bit` with its ignored CUDA-kernel
# comparison included (CPU and CUDA, steps 3–20 replayed from a captured CUDA graph) and `tests/lion8bit_state`
# (step_if, resume, refused files on CUDA). The new fixture is copied to $OUT/bnb-lion8bit-cuda.safetensors:
# commit it under tests/fixtures/ and drop the #[ignore] of `matches_bitsandbytes_cuda_kernel_over_20_steps`.
#
#   bash tools/gpu/lion8bit.sh   (after scripts/gpu-pack.sh --test bnb_lion8bit --test lion8bit_state)
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/lion8bit}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
status=0
python3 tools/fixtures/generate.py --only bnb_lion8bit_cuda --out tests/fixtures 2>&1 | tee "$out/generate.log" || status=1
if [ -f tests/fixtures/bnb-lion8bit-cuda.safetensors ]; then
    cp tests/fixtures/bnb-lion8bit-cuda.safetensors "$out/"
    md5sum "$out/bnb-lion8bit-cuda.safetensors"
else
    echo "lion8bit.sh: no CUDA fixture was written (see $out/generate.log)"; status=1
fi
OUT=$out bash scripts/gpu-entry.sh tests/bnb_lion8bit --include-ignored tests/lion8bit_state || status=1
exit $status
