#!/usr/bin/env bash
# Installs the PyTorch that tch 0.24 is built against (torch==2.11.0, from PyPI) into a virtual
# environment kept outside the checkout, so every clone on this machine shares it, and prints the
# environment torch-sys needs. Usage:  eval "$(scripts/bootstrap-libtorch.sh)"
set -euo pipefail

TORCH_VERSION="2.11.0"
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

torch_lib=$("$venv/bin/python" -c 'import torch,os;print(os.path.join(os.path.dirname(torch.__file__),"lib"))')
echo "export LIBTORCH_USE_PYTORCH=1"
echo "export PATH=\"$venv/bin:\$PATH\""
echo "export VIRTUAL_ENV=\"$venv\""
echo "export SDXL_LORA_TORCH_LIB=\"$torch_lib\""
