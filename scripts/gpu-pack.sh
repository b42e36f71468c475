#!/usr/bin/env bash
# Builds release test and example binaries here and gathers the ones named into .gpu/tests and
# .gpu/examples (git-ignored),
# ready to be carried to the GPU machine and run there by scripts/gpu-entry.sh (see docs/GPU.md).
#
#   scripts/gpu-pack.sh [--test NAME]... [--example NAME]... [--bench NAME]...
#
# With no names it packs the GPU smoke test. Binaries are stripped; what the run needs besides them
# (tests/fixtures, scripts) travels with the working tree. Python wheels go to .whl/ (docs/GPU.md).
set -euo pipefail
cd "$(dirname "$0")/.."
tests=() examples=() benches=()
while [ $# -gt 0 ]; do
    case "$1" in
        --test) tests+=("$2"); shift 2 ;;
        --example) examples+=("$2"); shift 2 ;;
        --bench) benches+=("$2"); shift 2 ;;
        *) echo "gpu-pack: unknown argument '$1' (expected --test, --example or --bench NAME)" >&2; exit 2 ;;
    esac
done
[ ${#tests[@]} -eq 0 ] && [ ${#examples[@]} -eq 0 ] && [ ${#benches[@]} -eq 0 ] && tests=(gpu_smoke)

eval "$(scripts/bootstrap-libtorch.sh)"
json=$(mktemp)
trap 'rm -f "$json"' EXIT
# Test targets come from `cargo test --no-run`, examples from `cargo build`, benches from
# `cargo bench --no-run` (all release builds).
if [ ${#tests[@]} -gt 0 ]; then
    t_args=(); for t in "${tests[@]}"; do t_args+=(--test "$t"); done
    cargo test --release --workspace --no-run --message-format=json "${t_args[@]}" >>"$json"
fi
if [ ${#examples[@]} -gt 0 ]; then
    e_args=(); for e in "${examples[@]}"; do e_args+=(--example "$e"); done
    cargo build --release --message-format=json "${e_args[@]}" >>"$json"
fi

if [ ${#benches[@]} -gt 0 ]; then
    b_args=(); for b in "${benches[@]}"; do b_args+=(--bench "$b"); done
    cargo bench --workspace --no-run --message-format=json "${b_args[@]}" >>"$json"
fi

rm -rf .gpu.partial && mkdir -p .gpu.partial/tests .gpu.partial/examples .gpu.partial/benches
python3 - "$json" "${tests[@]}" "${examples[@]}" "${benches[@]}" <<'PY' | while read -r name exe; do
import json, sys
wanted = set(sys.argv[2:])
for line in open(sys.argv[1]):
    if not line.startswith("{"):
        continue
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["target"]["name"] in wanted:
        kinds = msg["target"]["kind"]
        kind = "examples" if "example" in kinds else "benches" if "bench" in kinds else "tests"
        print(f"{kind}/{msg['target']['name']}", msg["executable"])
PY
    strip -o ".gpu.partial/$name" "$exe"
    echo "gpu-pack: $name ($(du -h ".gpu.partial/$name" | cut -f1))"
done
rm -rf .gpu && mv .gpu.partial .gpu
echo "gpu-pack: .gpu/ holds $(du -sh .gpu | cut -f1); carry it with: carry [\".gpu\"]"
