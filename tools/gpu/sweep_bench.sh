#!/usr/bin/env bash
# Sweeps on the GPU (issue 23's acceptance; docs/SWEEPS.md, docs/BENCHMARKS.md): K = 1, 2, 4, 8 LoRAs of
# the seed recipe on one frozen random-weight SDXL base, sequential and batched execution (both with
# --cuda_graph), against the single captured run in the same call. For each: the sweep's seconds per optimizer step (the wall clock
# of all K variants' steps, steady half), peak memory, LoRAs per hour at the recipe's 1200 steps; and each
# variant's final LoRA against the same variant's single run (run-to-run spread: a second single run).
# The tables are printed (and in $out/sweep-bench.log); everything else it writes under $out is bundled in
# $out/results.tgz at the end (the device returns at most 8 files).
#
#   bash tools/gpu/sweep_bench.sh [STEPS] [K...]      (default: 40 steps, K = 1 2 4 8)
#       SWEEP_BENCH_MODES="batched" runs only the batched sweeps (default "seq batched"); K runs in
#       the order given, so the ones that matter most can go first in a call with little time;
#       SWEEP_BENCH_SECONDS=N starts no sweep after N seconds of the script and cuts the one running
#       then, so the tables below are still printed inside a call's limit; SWEEP_BENCH_PROFILE=K
#       adds a batched sweep of K variants that records its whole step 6 (`--profile_step 5`,
#       graphs replaying by then) and prints tools/gpu/profile_summary.py's breakdown of it.
#       (.gpu/examples/train_naruto.xz: a stripped, xz-compressed release binary; the diffusers wheel in
#        .whl/ for tools/gpu/random_sdxl.py)
set -uo pipefail
cd "$(dirname "$0")/../.."
steps=${1:-40}  # a multiple of 20: metrics are logged every 10 steps, read at STEPS/2 and STEPS
shift || true
ks=("$@")
[ ${#ks[@]} -gt 0 ] || ks=(1 2 4 8)
deadline=$((SECONDS + ${SWEEP_BENCH_SECONDS:-100000}))
read -r -a modes <<<"${SWEEP_BENCH_MODES:-seq batched}"
for mode in "${modes[@]}"; do
    case "$mode" in
        seq | batched) ;;
        *) echo "sweep_bench: SWEEP_BENCH_MODES holds '$mode' (expected seq and/or batched)" >&2; exit 2 ;;
    esac
done
out=${OUT:-/tmp/sweep-bench}
source tools/gpu/setup.sh
gpu_setup sweep-bench.log
source tools/gpu/seed_bench.sh
for packed in .gpu/examples/*.xz; do
    [ -f "$packed" ] && xz -d -k -f "$packed" && chmod +x "${packed%.xz}"
done
seed_bench_data /tmp/patterns 16
filter="^\[trainer\] (step (2|$steps)\b|captured)|rror|variant .* (diverged|takes its micro-steps)|captured (the batched|variant|its optimizer)"

# The variants: learning rates and seeds around the recipe's (1e-4, seed 0), all rank 4 on the attention.
lrs=(1e-4 2e-4 5e-5 3e-4 1.5e-4 7e-5 2.5e-4 1.2e-4)
sweep_file() {  # K FILE
    local k=$1 file=$2
    {
        echo "[base]"
        echo "max_train_steps = $steps"
        for i in $(seq 0 $((k - 1))); do
            echo
            echo "[[variant]]"
            echo "name = \"v$i\""
            echo "learning_rate = ${lrs[$i]}"
            echo "seed = $i"
        done
    } >"$file"
}

sweep_run() {  # NAME K EXECUTION FLAGS...
    local name=$1 k=$2 execution=$3; shift 3
    local left=$((deadline - SECONDS))
    if [ "$left" -lt 30 ]; then
        echo "== sweep $name: not run (SWEEP_BENCH_SECONDS spent)"
        return
    fi
    sweep_file "$k" "/tmp/sweep-$k.toml"
    echo "== sweep $name: K = $k, $execution $*"
    timeout $((left < 420 ? left : 420)) ./.gpu/examples/train_naruto --pretrained_model_name_or_path "$seed_bench_model" \
        --dataset_name "$seed_bench_folder" --resolution 512 --train_batch_size 2 --gradient_accumulation_steps 2 \
        --max_train_samples none --instance_prompt "Naruto style anime character" \
        --max_train_steps "$steps" --checkpointing_steps 100000 --validation_prompt none \
        --sweep "/tmp/sweep-$k.toml" --sweep_execution "$execution" \
        --output_dir "/tmp/run-$name" "$@" 2>&1 | tee "/tmp/log-$name.txt" | grep -E "$filter" | cut -c1-300
    mkdir -p "$out/$name"
    cp /tmp/run-"$name"/sweep_summary.json "$out/$name/" 2>/dev/null
    for v in /tmp/run-"$name"/v*/; do
        cp "$v/logs/metrics.jsonl" "$out/$name/metrics-$(basename "$v").jsonl" 2>/dev/null
    done
}

# The single run of variant v0's settings (the recipe's: learning rate 1e-4, seed 0), captured as the
# recipe runs, twice (the run-to-run spread); every sweep captured too (--cuda_graph: sequential sweeps
# capture each variant's step as its run does, batched sweeps each shared call and each variant's
# optimizer step).
seed_bench_run single "$filter" "$steps"
seed_bench_run single2 "$filter" "$steps"
for k in "${ks[@]}"; do
    for mode in "${modes[@]}"; do
        execution=$([ "$mode" = seq ] && echo sequential || echo batched)
        sweep_run "$mode-$k" "$k" "$execution" --cuda_graph
    done
done

if [ -n "${SWEEP_BENCH_PROFILE:-}" ]; then
    sweep_run "profile-$SWEEP_BENCH_PROFILE" "$SWEEP_BENCH_PROFILE" batched --cuda_graph --profile_step 5
    grep -E "the sweep's step" "/tmp/log-profile-$SWEEP_BENCH_PROFILE.txt" | cut -c1-400
    for trace in /tmp/run-profile-"$SWEEP_BENCH_PROFILE"/profile/*.json; do
        [ -f "$trace" ] && python3 tools/gpu/profile_summary.py "$trace" --top 25 \
            --json "$out/summary-batched-$SWEEP_BENCH_PROFILE.json"
    done
fi

python3 - "$steps" "${modes[*]}" "${ks[@]}" <<'PY'
# Seconds per sweep step (all K variants), peak memory, LoRAs per hour at 1200 steps; each variant's
# final LoRA against its own single run is the spread check (v0 only: the single run is v0's settings).
import json, sys
from pathlib import Path
steps, modes, ks = int(sys.argv[1]), sys.argv[2].split(), [int(k) for k in sys.argv[3:]]

def per_step(metrics):
    rows = {r["step"]: r for r in map(json.loads, open(metrics))}
    a, b = rows.get(steps // 2), rows.get(steps)
    if not (a and b):
        return None, None
    peak = max(r.get("peak_memory_gib") or 0 for r in rows.values())
    return (b["elapsed_s"] - a["elapsed_s"]) / (steps - steps // 2), peak

print(f"{'run':<14} {'K':>2} {'s/step':>8} {'vs K=1':>7} {'vs single':>9} {'peak GiB':>9} {'LoRAs/h':>8}")
single, speak = per_step("/tmp/run-single/logs/metrics.jsonl")
print(f"{'single (graph)':<14} {1:>2} {single or float('nan'):8.4f} {'':>7} {'1.00':>9} {speak or 0:9.2f} {3600 / (1200 * single) if single else 0:8.2f}")
for mode in modes:
    base = None
    for k in ks:
        path = Path(f"/tmp/run-{mode}-{k}/v0/logs/metrics.jsonl")
        if not path.exists():
            print(f"{mode:<14} {k:>2} (no metrics)")
            continue
        per, peak = per_step(path)
        if per is None:
            print(f"{mode:<14} {k:>2} (incomplete)")
            continue
        base = per if k == 1 else base
        vs_k1 = f"{per / base:7.2f}" if base else f"{'-':>7}"
        vs_single = f"{per / single:9.2f}" if single else f"{'-':>9}"
        print(f"{mode:<14} {k:>2} {per:8.4f} {vs_k1} {vs_single} {peak:9.2f} {k * 3600 / (1200 * per):8.2f}")
PY

python3 - "${modes[*]}" "${ks[@]}" <<'PY'
# Variant v0 of every sweep against the single run of its settings, and the single run against its
# repeat (the run-to-run spread on this GPU): max |delta| and the relative L2 difference over the LoRA.
import sys
from safetensors.torch import load_file
def load(path):
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - a missing run is reported, not fatal
        print(f"{path}: {e}")
        return None
def compare(name, a, b):
    if a is None or b is None:
        return
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    num = sum(((a[k].float() - b[k].float()) ** 2).sum().item() for k in a) ** 0.5
    den = sum((b[k].float() ** 2).sum().item() for k in b) ** 0.5
    print(f"{name:<34} max |delta| {diff:.3e}, relative L2 {num / den:.3e}")
single = load("/tmp/run-single/pytorch_lora_weights.safetensors")
compare("single2 vs single (spread)", load("/tmp/run-single2/pytorch_lora_weights.safetensors"), single)
for mode in sys.argv[1].split():
    for k in sys.argv[2:]:
        compare(f"{mode}-{k}/v0 vs single", load(f"/tmp/run-{mode}-{k}/v0/pytorch_lora_weights.safetensors"), single)
PY

# The device returns at most 8 files: everything written under $out except the log, in one archive.
bundle=(); while IFS= read -r -d '' entry; do bundle+=("$entry"); done < <(
    find "$out" -mindepth 1 -maxdepth 1 ! -name sweep-bench.log ! -name results.tgz -printf '%P\0' | sort -z)
if [ ${#bundle[@]} -gt 0 ] && tar -C "$out" -czf /tmp/sweep-bench-results.tgz "${bundle[@]}"; then
    (cd "$out" && rm -rf -- "${bundle[@]}") && mv /tmp/sweep-bench-results.tgz "$out/results.tgz"
    echo "results: $out/results.tgz (${#bundle[@]} entries: tar -tzf lists them)"
fi
