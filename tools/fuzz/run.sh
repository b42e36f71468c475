#!/usr/bin/env bash
# One AFL++ campaign on one fuzz target (issue 24, deliverable 7; docs/RELIABILITY.md, "Fuzzing"):
#
#   tools/fuzz/run.sh TARGET SECONDS     e.g. tools/fuzz/run.sh train_config 3600
#   tools/fuzz/run.sh --list             the targets
#
# Builds the instrumented `fuzz_target` (`cargo afl build` in fuzz/, its own workspace and target
# folder), then runs `cargo afl fuzz` for SECONDS from the committed corpus fuzz/corpus/TARGET into
# fuzz/out/TARGET (resumed when it exists), at low priority, with a memory limit (-m, so a run out of
# memory is a crash) and a time limit per input (-t, so a hang is reported), and prints the figures of
# AFL's fuzzer_stats: executions, time, executions per second, crashes, hangs. Crashing and hanging
# inputs are left in fuzz/out/TARGET/default/{crashes,hangs}; replay one with
#   fuzz/target/debug/fuzz_target TARGET < FILE
# (outside AFL the binary runs one input from stdin). Environment: FUZZ_MEMORY_MB (default 4096),
# FUZZ_TIMEOUT_MS (default 2000; 10000 for lora_file and checkpoint), SDXL_LORA_FUZZ_WORK (the
# target's scratch folder; default /dev/shm/sdxl-lora-fuzz-TARGET), FUZZ_NO_BUILD=1 (skip the build),
# FUZZ_EXECS=N (stop after about N executions, AFL's -E, or after SECONDS, whichever comes first).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
targets=$(sed -n '/^pub const NAMES/,/^];/p' fuzz/src/targets/mod.rs | grep -o '"[a-z_0-9]*"' | tr -d '"')
if [ "${1:-}" = "--list" ]; then
    echo "$targets"
    exit 0
fi
if [ $# -ne 2 ] || ! grep -qx "$1" <<<"$targets"; then
    echo "usage: tools/fuzz/run.sh TARGET SECONDS; targets: $(echo $targets)" >&2
    exit 2
fi
target=$1
seconds=$2
eval "$(scripts/bootstrap-libtorch.sh)"
# FUZZ_NO_BUILD=1 fuzzes the binary already built (e.g. while the library is being edited).
[ -n "${FUZZ_NO_BUILD:-}" ] || (cd fuzz && cargo afl build)
case "$target" in
    lora_file | checkpoint) timeout_ms=${FUZZ_TIMEOUT_MS:-10000} ;;
    *) timeout_ms=${FUZZ_TIMEOUT_MS:-2000} ;;
esac
dictionaries="$HOME/.local/share/afl.rs/AFLplusplus/dictionaries"
case "$target" in
    model_config | metadata_jsonl) dict=json.dict ;;
    train_config | kohya_dataset) dict=toml.dict ;;
    image) dict=png.dict ;;
    *) dict= ;;
esac
limit_args=()
if [ -n "${FUZZ_EXECS:-}" ]; then
    limit_args=(-E "$FUZZ_EXECS")
fi
dict_args=()
if [ -n "$dict" ] && [ -f "$dictionaries/$dict" ]; then
    dict_args=(-x "$dictionaries/$dict")
fi
out="fuzz/out/$target"
mkdir -p "$out"
export SDXL_LORA_FUZZ_WORK=${SDXL_LORA_FUZZ_WORK:-/dev/shm/sdxl-lora-fuzz-$target}
# No CPU governor or core dump handler to tune here; no screen UI; resume an earlier campaign; the
# checkpoint target trains one step before the fork server starts.
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1 AFL_AUTORESUME=1
export AFL_FORKSRV_INIT_TMOUT=${AFL_FORKSRV_INIT_TMOUT:-300000}
start=$(date +%s)
nice -n 10 cargo afl fuzz -i "fuzz/corpus/$target" -o "$out" -V "$seconds" \
    -m "${FUZZ_MEMORY_MB:-4096}" -t "$timeout_ms" "${limit_args[@]}" "${dict_args[@]}" \
    -- fuzz/target/debug/fuzz_target "$target" >"$out/afl.log" 2>&1 || {
    tail -30 "$out/afl.log" >&2
    exit 1
}
stats="$out/default/fuzzer_stats"
field() { sed -n "s/^$1 *: //p" "$stats"; }
crashes=$(find "$out/default/crashes" -type f -name 'id:*' | wc -l)
hangs=$(find "$out/default/hangs" -type f -name 'id:*' | wc -l)
echo "target $target: $(field execs_done) executions in $(field run_time) s (this call $(($(date +%s) - start)) s wall)," \
    "$(field execs_per_sec) exec/s, corpus $(field corpus_count), crashes $crashes, hangs $hangs," \
    "memory limit ${FUZZ_MEMORY_MB:-4096} MB, timeout $timeout_ms ms"
