#!/usr/bin/env bash
# Issue 19's GPU check of torch_cuda::dist: the torch-cuda test `dist` on the GPU machine, where its
# NCCL test runs one rank per GPU (two on a 2-GPU machine, one on a single GPU): exact sums of CUDA
# tensors through ProcessGroupNCCL, a 0-dim MAX, a broadcast, and an all-reduce captured in a CUDA
# graph and replayed; the Gloo tests run too (CPU, two processes each).
#
#   scripts/gpu-pack.sh --test dist    (here), then on the GPU machine:   bash tools/gpu/dist_nccl.sh
# Expected: every test ok, nccl_reduces_cuda_tensors_also_inside_a_cuda_graph not skipped
# (gpu-entry.sh sets SDXL_REQUIRE_CUDA=1, which makes a skip a failure).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/dist-nccl}
mkdir -p "$out"
nvidia-smi --query-gpu=index,name --format=csv,noheader 2>/dev/null
NCCL_DEBUG=${NCCL_DEBUG:-WARN} OUT=$out bash scripts/gpu-entry.sh tests/dist 2>&1 | grep -E "^test |test result|panicked|rank [0-9]|NCCL"
