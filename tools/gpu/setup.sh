# Sourced by the tools/gpu/*.sh scripts on the GPU machine: `gpu_setup LOG_NAME [WHEEL ...]` makes $out,
# copies everything printed from then on to $out/LOG_NAME, points the loader at the machine's own torch,
# installs the carried wheels (default: all of .whl/) into /tmp/site for python3, and prints the device.
gpu_setup() {
    local log=$1; shift
    mkdir -p "$out"
    exec > >(tee -a "$out/$log") 2>&1
    local torch_lib
    torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
    export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    [ $# -gt 0 ] || set -- .whl/*.whl
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$@"
    export PYTHONPATH=/tmp/site
    echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null)"
}

# `gpu_bundle`: the device returns at most 8 files from $OUT, so everything a script wrote under $out
# except its logs goes into one $out/results.tgz (call it last, or from an EXIT trap).
gpu_bundle() {
    [ -d "$out" ] || return 0
    local files
    files=$(cd "$out" && find . -type f ! -name results.tgz ! -name '*.log' | sort)
    [ -n "$files" ] || return 0
    (cd "$out" && tar czf results.tgz $files && rm -f $files && find . -mindepth 1 -type d -empty -delete)
}
