#!/usr/bin/env bash
# The test suite again under one of libtorch's CPU kernel sets (the Makefile's test-cpu-kernels, after
# `cargo test --workspace` ran it under the machine's own): every numeric bound comes from an error
# model and must hold on any x86-64 CPU, and seeded noise must not change (docs/NUMERICS.md).
#
#   scripts/test-cpu-kernels.sh CAPABILITY        (default, avx2 or avx512: ATEN_CPU_CAPABILITY)
#
# Every unit test and every integration test of the workspace runs, except the root package's tests of
# command-line behaviour, files and processes listed below, whose outcome does not depend on the CPU's
# kernels (usage errors, refusals naming a culprit, output-folder locks, fuzz inputs refused): they ran
# in the first pass, and leaving them out of the repeat keeps CI under its 30 minutes. Doc tests ran
# there too. A new test file is included unless it is added to the list. One `cargo test --workspace`
# with the first pass's selection of packages, so the same build: nothing recompiles.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    default | avx2 | avx512) ;;
    *) echo "test-cpu-kernels: expected a capability (default, avx2 or avx512), got '${1:-}'" >&2; exit 2 ;;
esac
behaviour=(bad_inputs examples_cli fuzz_replay input_checks output_folder sdxl_lora_cli)
for name in "${behaviour[@]}"; do
    [ -f "tests/$name.rs" ] || { echo "test-cpu-kernels: tests/$name.rs is listed but missing" >&2; exit 2; }
done
targets=()
for file in tests/*.rs crates/*/tests/*.rs; do
    name=$(basename "$file" .rs)
    if [ "${file%/*}" = tests ] && [[ " ${behaviour[*]} " == *" $name "* ]]; then
        continue
    fi
    [[ " ${targets[*]} " == *" --test $name "* ]] || targets+=(--test "$name")
done
export ATEN_CPU_CAPABILITY=$1
echo "ATEN_CPU_CAPABILITY=$1 (without the root package's ${behaviour[*]})"
scripts/with-torch.sh cargo test --workspace --lib --bins "${targets[@]}"
