#!/usr/bin/env bash
# Repacks a bitsandbytes manylinux x86_64 wheel with only the native libraries the GPU machine loads, so it
# travels next to the diffusers wheel within the 64 MiB a device call may carry (docs/GPU.md).
#
#   scripts/trim-bnb-wheel.sh <bitsandbytes-*.whl> <out dir> [CUDA_TAG]      (CUDA_TAG default: 130)
#
# bitsandbytes picks its library from torch.version.cuda ("13.0" -> libbitsandbytes_cuda130.so, exact match
# first; bitsandbytes/cextension.py) and falls back to libbitsandbytes_cpu.so without CUDA. The wheel ships
# one library per CUDA and ROCm release and two for XPU (129 MB unpacked, 43 MB packed); the trimmed wheel
# keeps libbitsandbytes_cuda<CUDA_TAG>.so and libbitsandbytes_cpu.so and nothing else of that kind. Every
# other entry is copied byte for byte with its original timestamp and order, and RECORD is rewritten for the
# remaining files (sha256, urlsafe base64 without padding, size), so `pip install` verifies it and reruns
# give identical bytes. The file keeps its name: same project, same version, same tags.
set -euo pipefail
if [ $# -lt 2 ] || [ $# -gt 3 ]; then
    echo "usage: $0 <bitsandbytes wheel> <out dir> [CUDA_TAG, e.g. 130]" >&2
    exit 2
fi
wheel=$1 out_dir=$2 cuda_tag=${3:-130}
[ -f "$wheel" ] || { echo "trim-bnb-wheel: no such wheel: $wheel" >&2; exit 1; }
[[ "$cuda_tag" =~ ^[0-9]+$ ]] || { echo "trim-bnb-wheel: CUDA_TAG must be digits (e.g. 130), got '$cuda_tag'" >&2; exit 2; }
mkdir -p "$out_dir"
python=$(command -v python3 || command -v python) || { echo "trim-bnb-wheel: needs python3" >&2; exit 1; }

"$python" - "$wheel" "$out_dir" "$cuda_tag" <<'EOF'
import base64, hashlib, os, re, sys, tempfile, zipfile

wheel, out_dir, cuda_tag = sys.argv[1], sys.argv[2], sys.argv[3]
keep_libs = {f"libbitsandbytes_cuda{cuda_tag}.so", "libbitsandbytes_cpu.so"}
native = re.compile(r"^bitsandbytes/libbitsandbytes_[A-Za-z0-9_]+\.so$")

with zipfile.ZipFile(wheel) as src:
    infos = src.infolist()
    names = [i.filename for i in infos]
    records = [n for n in names if re.fullmatch(r"[^/]+\.dist-info/RECORD", n)]
    if len(records) != 1:
        sys.exit(f"trim-bnb-wheel: {wheel}: expected one .dist-info/RECORD, found {records}")
    record_name = records[0]
    present = {os.path.basename(n) for n in names if native.match(n)}
    missing = keep_libs - present
    if missing:
        sys.exit(f"trim-bnb-wheel: {wheel} lacks {sorted(missing)}; it has {sorted(present)}")
    dropped = [n for n in names if native.match(n) and os.path.basename(n) not in keep_libs]

    def digest(data: bytes) -> str:
        return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

    target = os.path.join(out_dir, os.path.basename(wheel))
    tmp = tempfile.NamedTemporaryFile(dir=out_dir, prefix=".trim-", suffix=".whl", delete=False)
    tmp.close()
    try:
        lines = []
        with zipfile.ZipFile(tmp.name, "w", compression=zipfile.ZIP_DEFLATED) as dst:
            for info in infos:
                if info.filename in dropped or info.filename == record_name:
                    continue
                data = src.read(info)
                if not info.is_dir():
                    lines.append(f"{info.filename},{digest(data)},{len(data)}")
                dst.writestr(info, data, compress_type=info.compress_type)
            record_info = src.getinfo(record_name)
            lines.append(f"{record_name},,")
            dst.writestr(record_info, ("\n".join(lines) + "\n").encode(), compress_type=record_info.compress_type)
        os.chmod(tmp.name, 0o644)
        os.replace(tmp.name, target)
    except BaseException:
        os.unlink(tmp.name)
        raise

size = os.path.getsize(target)
print(f"trim-bnb-wheel: {target}: {size / 2**20:.1f} MiB ({os.path.getsize(wheel) / 2**20:.1f} MiB before); "
      f"kept {', '.join(sorted(keep_libs))}; dropped {len(dropped)} native libraries")
EOF
