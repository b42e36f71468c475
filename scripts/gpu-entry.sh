#!/usr/bin/env bash
# Runs on the GPU machine, in the carried working tree: points the loader at that machine's own
# torch, installs carried wheels (if any), and runs the binaries that scripts/gpu-pack.sh gathered.
#
#   bash scripts/gpu-entry.sh [tests/NAME | examples/NAME | benches/NAME [ARGS]] ...   (default: every test)
#
# Test binaries run with --nocapture so their figures appear in the log; the log is also written
# to $OUT/gpu-run.log when $OUT is set. An example's arguments follow its name up to the next name.
set -uo pipefail
cd "$(dirname "$0")/.."
torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') || {
    echo "gpu-entry: python3 has no torch" >&2; exit 1; }
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export SDXL_FIXTURES="$PWD/tests/fixtures" SDXL_REQUIRE_CUDA=1 RUST_BACKTRACE=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
log=${OUT:-/tmp}/gpu-run.log
[ $# -eq 0 ] && set -- $(cd .gpu && ls -d tests/* 2>/dev/null)
{
    echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null)"
    echo "== torch $(python3 -c 'import torch; print(torch.__version__)') at $torch_lib"
    status=0
    while [ $# -gt 0 ]; do
        name=$1; shift
        args=()
        while [ $# -gt 0 ] && [[ "$1" != tests/* && "$1" != examples/* && "$1" != benches/* ]]; do args+=("$1"); shift; done
        echo "== .gpu/$name ${args[*]}"
        case "$name" in
            tests/*) "./.gpu/$name" --nocapture --test-threads=1 "${args[@]}" || status=1 ;;
            benches/*) "./.gpu/$name" --bench "${args[@]}" || status=1 ;;
            *) "./.gpu/$name" "${args[@]}" || status=1 ;;
        esac
    done
    echo "== exit status $status"
    exit $status
} 2>&1 | tee -a "$log"
