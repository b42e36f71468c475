#!/usr/bin/env bash
# The test suite again under one of libtorch's CPU kernel sets (the Makefile's test-cpu-kernels, after
# `cargo test --workspace` ran it under the machine's own): every numeric bound comes from an error
# model and must hold on any x86-64 CPU, and seeded noise must not change (docs/NUMERICS.md).
#
#   scripts/test-cpu-kernels.sh CAPABILITY        (default or avx2: ATEN_CPU_CAPABILITY)
#
# Every crate's unit and integration tests run, except the root package's tests of command-line
# behaviour, files and processes listed below, whose outcome does not depend on the CPU's kernels (usage
# errors, refusals naming a culprit, output-folder locks, fuzz inputs refused): they ran in the first
# pass, and leaving them out of the two repeats keeps CI under its 30 minutes. Doc tests ran there too.
# A new file in tests/ is included unless it is added to the list. Same build as the first pass: nothing
# recompiles.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    default | avx2 | avx512) ;;
    *) echo "test-cpu-kernels: expected a capability (default, avx2 or avx512), got '${1:-}'" >&2; exit 2 ;;
esac
behaviour=(bad_inputs examples_cli fuzz_replay input_checks output_folder sdxl_lora_cli)
targets=()
for file in tests/*.rs; do
    name=$(basename "$file" .rs)
    [[ " ${behaviour[*]} " == *" $name "* ]] || targets+=(--test "$name")
done
for name in "${behaviour[@]}"; do
    [ -f "tests/$name.rs" ] || { echo "test-cpu-kernels: tests/$name.rs is listed but missing" >&2; exit 2; }
done
export ATEN_CPU_CAPABILITY=$1
echo "ATEN_CPU_CAPABILITY=$1 (root package without: ${behaviour[*]})"
scripts/with-torch.sh cargo test --workspace --exclude sdxl-lora --lib --bins --tests
scripts/with-torch.sh cargo test -p sdxl-lora --lib --bins "${targets[@]}"
