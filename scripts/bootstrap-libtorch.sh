#!/usr/bin/env bash
# Prints the environment that makes torch-sys, crates/torch-link and crates/torch-cuda build against a
# PyTorch 2.11.0 (the version tch 0.24 is built against). Usage:  eval "$(scripts/bootstrap-libtorch.sh)"
#
# * By default it installs torch==2.11.0 from PyPI (the CUDA 13.0 build, which needs an NVIDIA driver
#   >= 580 on Linux) into a virtual environment kept outside the checkout, so every clone on this machine
#   shares it, and points torch-sys at that venv's python (LIBTORCH_USE_PYTORCH=1).
# * LIBTORCH=/path/to/libtorch: a libtorch 2.11.0 already there (a libtorch zip of any CUDA build, or a
#   torch wheel's torch/ folder: include/ and lib/); nothing is downloaded.
# * SDXL_LORA_PYTHON=/path/to/python: a python whose torch is 2.11.0 of any build (e.g. 2.11.0+cu126);
#   its torch/ folder is used as LIBTORCH; nothing is downloaded.
# (PYTHON is the interpreter that creates the default venv.)
set -euo pipefail

TORCH_VERSION="2.11.0"

fail() {
    echo "bootstrap: $*" >&2
    exit 1
}

# The version of the libtorch folder $1: its build-version file (libtorch zips), torch/version.py (a
# wheel's torch/ folder), else the version header.
libtorch_version() {
    local root=$1 header
    if [ -f "$root/build-version" ]; then
        tr -d '[:space:]' <"$root/build-version"
    elif [ -f "$root/version.py" ]; then
        sed -n "s/^__version__ = '\(.*\)'$/\1/p" "$root/version.py"
    else
        for header in include/torch/headeronly/version.h include/torch/csrc/api/include/torch/version.h; do
            [ -f "$root/$header" ] || continue
            local major minor patch
            major=$(sed -n 's/^#define TORCH_VERSION_MAJOR \([0-9]*\)$/\1/p' "$root/$header")
            minor=$(sed -n 's/^#define TORCH_VERSION_MINOR \([0-9]*\)$/\1/p' "$root/$header")
            patch=$(sed -n 's/^#define TORCH_VERSION_PATCH \([0-9]*\)$/\1/p' "$root/$header")
            if [ -n "$major" ]; then
                echo "$major.$minor.$patch"
                return
            fi
        done
    fi
}

# Warns when crates/torch-cuda will find no CUDA headers (crt/ included) for libtorch folder $1: it then
# builds without its C++ shim (CUDA graphs, profiler, memory statistics).
check_cuda_headers() {
    [ -f "$1/../nvidia/cu13/include/crt/host_defines.h" ] ||
        [ -f "${CUDA_HOME:-/nonexistent}/include/crt/host_defines.h" ] ||
        echo "bootstrap: no CUDA headers beside $1 or in \$CUDA_HOME; torch-cuda builds without its shim (CUDA graphs, profiler, memory statistics)" >&2
}

if [ -n "${LIBTORCH:-}" ] && [ -n "${SDXL_LORA_PYTHON:-}" ]; then
    fail "set LIBTORCH or SDXL_LORA_PYTHON, not both"
fi

# torch-sys reads LIBTORCH (headers under include/, libraries under lib/, or under LIBTORCH_INCLUDE and
# LIBTORCH_LIB when set) unless LIBTORCH_USE_PYTORCH is set, which would take precedence.
if [ -n "${LIBTORCH:-}" ]; then
    root=$(cd "$LIBTORCH" 2>/dev/null && pwd) || fail "LIBTORCH=$LIBTORCH: no such folder"
    lib_root=$(cd "${LIBTORCH_LIB:-$root}" 2>/dev/null && pwd) || fail "LIBTORCH_LIB=$LIBTORCH_LIB: no such folder"
    [ -f "$lib_root/lib/libtorch.so" ] && [ -d "${LIBTORCH_INCLUDE:-$root}/include/torch" ] ||
        fail "LIBTORCH=$LIBTORCH: not a libtorch folder (no lib/libtorch.so or include/torch/)"
    found=$(libtorch_version "$root")
    [ "${found%%+*}" = "$TORCH_VERSION" ] ||
        fail "LIBTORCH=$LIBTORCH is libtorch ${found:-of unknown version}; tch 0.24 needs $TORCH_VERSION"
    check_cuda_headers "$lib_root"
    echo "unset LIBTORCH_USE_PYTORCH"
    echo "export LIBTORCH=\"$root\""
    echo "export SDXL_LORA_TORCH_LIB=\"$lib_root/lib\""
    exit 0
fi

# A python's torch/ folder is a libtorch folder; its ABI flag is the one to compile with.
if [ -n "${SDXL_LORA_PYTHON:-}" ]; then
    command -v "$SDXL_LORA_PYTHON" >/dev/null || fail "SDXL_LORA_PYTHON=$SDXL_LORA_PYTHON: no such program"
    info=$("$SDXL_LORA_PYTHON" -c 'import os, torch; print(torch.__version__, int(torch._C._GLIBCXX_USE_CXX11_ABI), os.path.dirname(torch.__file__))' 2>/dev/null) ||
        fail "SDXL_LORA_PYTHON=$SDXL_LORA_PYTHON: cannot import torch with it"
    read -r found cxx11_abi root <<<"$info"
    [ "${found%%+*}" = "$TORCH_VERSION" ] ||
        fail "SDXL_LORA_PYTHON=$SDXL_LORA_PYTHON has torch $found; tch 0.24 needs $TORCH_VERSION"
    [ -f "$root/lib/libtorch.so" ] && [ -d "$root/include/torch" ] ||
        fail "SDXL_LORA_PYTHON=$SDXL_LORA_PYTHON: its torch at $root lacks lib/libtorch.so or include/torch/"
    check_cuda_headers "$root"
    echo "unset LIBTORCH_USE_PYTORCH LIBTORCH_INCLUDE LIBTORCH_LIB"
    echo "export LIBTORCH=\"$root\""
    echo "export LIBTORCH_CXX11_ABI=$cxx11_abi"
    echo "export SDXL_LORA_TORCH_LIB=\"$root/lib\""
    exit 0
fi

cache_root="${SDXL_LORA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sdxl-lora-rs}"
venv="${SDXL_LORA_TORCH_VENV:-$cache_root/torch-$TORCH_VERSION}"
python="${PYTHON:-python3}"

have_torch() {
    [ -x "$venv/bin/python" ] &&
        "$venv/bin/python" -c "import torch,sys; sys.exit(0 if torch.__version__.split('+')[0]=='$TORCH_VERSION' else 1)" 2>/dev/null
}

if ! have_torch; then
    echo "bootstrap: installing torch==$TORCH_VERSION into $venv (first run only, ~5 GB)" >&2
    mkdir -p "$cache_root"
    # Build in a temporary folder and rename, so an interrupted install is never taken for a good one.
    tmp="$venv.partial.$$"
    rm -rf "$tmp"
    "$python" -m venv "$tmp" >&2
    "$tmp/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
    "$tmp/bin/python" -m pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" numpy >&2
    rm -rf "$venv"
    # A venv records its own path; recreate the entry points for the final location.
    mv "$tmp" "$venv"
    "$python" -m venv --upgrade "$venv" >&2
    have_torch || { echo "bootstrap: torch $TORCH_VERSION did not import from $venv" >&2; exit 1; }
fi

# CUDA's crt/ headers (not in torch's wheels) let crates/torch-cuda compile its C++ shim against
# torch's headers; small, and installed once into the same venv.
if ! "$venv/bin/python" -c "import nvidia.cu13, os, sys; sys.exit(0 if os.path.exists(os.path.join(nvidia.cu13.__path__[0], 'include', 'crt', 'host_defines.h')) else 1)" 2>/dev/null; then
    echo "bootstrap: installing CUDA crt headers (nvidia-cuda-crt 13.0)" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "nvidia-cuda-crt==13.0.*" >&2 ||
        echo "bootstrap: nvidia-cuda-crt unavailable; the CUDA memory-statistics shim will be left out" >&2
fi
# CCCL's nv/target, which nccl.h's cuda_fp16.h includes: crates/torch-cuda's NCCL process-group
# backend (src/dist_nccl.cpp) is compiled only where it is. Only where torch's CUDA wheel is.
if "$venv/bin/python" -c "import nvidia.cu13, nvidia.nccl" 2>/dev/null &&
    ! "$venv/bin/python" -c "import nvidia.cu13, os, sys; sys.exit(0 if os.path.exists(os.path.join(nvidia.cu13.__path__[0], 'include', 'nv', 'target')) else 1)" 2>/dev/null; then
    echo "bootstrap: installing CUDA CCCL headers (nvidia-cuda-cccl 13.0)" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "nvidia-cuda-cccl==13.0.*" >&2 ||
        echo "bootstrap: nvidia-cuda-cccl unavailable; process groups will have no NCCL backend" >&2
fi

torch_lib=$("$venv/bin/python" -c 'import torch,os;print(os.path.join(os.path.dirname(torch.__file__),"lib"))')
echo "export LIBTORCH_USE_PYTORCH=1"
echo "export PATH=\"$venv/bin:\$PATH\""
echo "export VIRTUAL_ENV=\"$venv\""
echo "export SDXL_LORA_TORCH_LIB=\"$torch_lib\""
