#!/usr/bin/env python3
"""Summarizes a Chrome trace written by libtorch's profiler: ours (`train_naruto --profile_step`,
`vae_decode --profile`, torch-cuda's Profiler) or torch.profiler's `export_chrome_trace` (diffusers'
side in tools/gpu/reference_train.py --profile). Standard library only.

    python3 tools/gpu/profile_summary.py TRACE.json [--top 25] [--json OUT.json]

Prints: the window's wall time; device time (sum of kernel, copy and memset durations) and device busy
time (their union); kernel count; device time by category (matrix products, convolutions, attention,
normalization, elementwise, reductions, optimizer, copies); the top kernels; host time (the union of
top-level operators and CUDA runtime calls on the host threads); and, where the trace holds
allocation events, the peak allocated memory with the live allocations at that moment grouped by
the operator that made them.
"""
import argparse
import bisect
import json
import re
from collections import defaultdict

CATEGORIES = [  # first match wins; matched against the lowercased kernel name
    ("attention", r"flash|fmha|attention|_efficient_attention|cutlass.*attn"),
    ("convolution", r"conv|implicit_convolve|dgrad|wgrad|fprop|xmma_.*nhwc|cudnn|nchwtonhwc|nhwctonchw"),
    ("matrix product", r"gemm|nvjet|cutlass|cublas|splitkreduce|sm90_xmma|sm80_xmma|matmul"),
    ("normalization", r"norm|welford|rowwisemoments|compute_mean_std|computefused|groupnorm|layernorm|^gn_"),
    ("optimizer", r"optimizer|adam|kpreconditionoptimizer|koptimizer|fused_adam|multi_tensor"),
    ("reduction", r"reduce"),
    ("copy / cast", r"copy|memcpy|memset|cat_|catarraybatched|fill|transpose|permute|index"),
    ("elementwise", r"elementwise|vectorized|unrolled|pointwise|activation|silu|gelu|softmax|mul|add"),
]


def category(name):
    low = name.lower()
    for label, pattern in CATEGORIES:
        if re.search(pattern, low):
            return label
    return "other"


def union(intervals):
    total, end = 0.0, None
    start = None
    for s, e in sorted(intervals):
        if end is None or s > end:
            if end is not None:
                total += end - start
            start, end = s, e
        else:
            end = max(end, e)
    if end is not None:
        total += end - start
    return total


def short(name, width=110):
    name = re.sub(r"\s+", " ", name)
    return name if len(name) <= width else name[: width - 3] + "..."


def summarize(path, top):
    with open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    device_events = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    cpu_ops = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation")]
    runtime = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver")]
    timed = [e for e in events if e.get("ph") == "X" and "dur" in e and e.get("cat") not in (None, "Trace")]
    if not timed:
        raise SystemExit(f"{path}: no timed events")
    window_start = min(e["ts"] for e in timed)
    window_end = max(e["ts"] + e["dur"] for e in timed)
    out = {"trace": path, "wall_ms": (window_end - window_start) / 1e3}
    kernels = [e for e in device_events if e["cat"] == "kernel"]
    out["kernels"] = len(kernels)
    out["device_ms"] = sum(e["dur"] for e in device_events) / 1e3
    out["device_busy_ms"] = union([(e["ts"], e["ts"] + e["dur"]) for e in device_events]) / 1e3
    by_category = defaultdict(lambda: [0.0, 0])
    by_name = defaultdict(lambda: [0.0, 0])
    for e in device_events:
        label = "copy / cast" if e["cat"] != "kernel" else category(e["name"])
        by_category[label][0] += e["dur"] / 1e3
        by_category[label][1] += 1
        by_name[e["name"]][0] += e["dur"] / 1e3
        by_name[e["name"]][1] += 1
    out["by_category"] = {k: {"ms": round(v[0], 3), "count": v[1]} for k, v in sorted(by_category.items(), key=lambda kv: -kv[1][0])}
    out["top_kernels"] = [{"name": k, "ms": round(v[0], 3), "count": v[1]} for k, v in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]]
    # Host: operators and runtime calls, merged per thread, then summed over threads.
    per_thread = defaultdict(list)
    for e in cpu_ops + runtime:
        per_thread[e.get("tid")].append((e["ts"], e["ts"] + e["dur"]))
    out["host_busy_ms"] = sum(union(v) for v in per_thread.values()) / 1e3
    out["host_ops"] = len(cpu_ops)
    out["memory"] = memory(events, cpu_ops, top)
    return out


def memory(events, cpu_ops, top):
    allocations = [e for e in events if e.get("name") == "[memory]" and "args" in e]
    allocations = [e for e in allocations if e["args"].get("Device Type", 1) != 0]  # not host memory
    if not allocations:
        return None
    allocations.sort(key=lambda e: e["ts"])
    # The innermost operator enclosing each allocation, on the allocating thread.
    ops_by_thread = defaultdict(list)
    for op in cpu_ops:
        ops_by_thread[op.get("tid")].append(op)
    starts = {}
    for tid, ops in ops_by_thread.items():
        ops.sort(key=lambda op: op["ts"])
        starts[tid] = [op["ts"] for op in ops]

    def owner(e):
        # Operators nest, so the innermost one around `e` is the latest-starting one still running.
        ops, best = ops_by_thread.get(e.get("tid"), []), None
        i = bisect.bisect_right(starts.get(e.get("tid"), []), e["ts"]) - 1
        while i >= 0:
            if ops[i]["ts"] + ops[i]["dur"] >= e["ts"]:
                best = ops[i]
                break
            i -= 1
        if best is None:
            return "(outside any operator)"
        dims = best.get("args", {}).get("Input Dims")
        return best["name"] + (f" {dims}" if dims else "")

    live, peak, peak_at, peak_live = {}, -1, None, {}
    for e in allocations:
        args = e["args"]
        addr, size = args.get("Addr"), args.get("Bytes", 0)
        if size > 0:
            live[addr] = (size, e)
        else:
            live.pop(addr, None)
        total = args.get("Total Allocated", 0)
        if total > peak:
            peak, peak_at, peak_live = total, e, dict(live)
    groups = defaultdict(lambda: [0, 0])
    for size, e in peak_live.values():
        key = owner(e)
        groups[key][0] += size
        groups[key][1] += 1
    tracked = sum(size for size, _ in peak_live.values())
    gib = 1 << 30
    return {
        "peak_gib": round(peak / gib, 4),
        "at_operator": owner(peak_at),
        "allocated_before_the_window_gib": round((peak - tracked) / gib, 4),
        "live_in_the_window_gib": round(tracked / gib, 4),
        "live_by_operator": [{"operator": short(k, 160), "mib": round(v[0] / (1 << 20), 2), "count": v[1]}
                             for k, v in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("traces", nargs="+")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", default=None, help="also write the summaries here")
    args = parser.parse_args()
    summaries = []
    for path in args.traces:
        s = summarize(path, args.top)
        summaries.append(s)
        print(f"== {path}")
        print(f"wall {s['wall_ms']:.2f} ms; device {s['device_ms']:.2f} ms in {s['kernels']} kernels "
              f"(busy {s['device_busy_ms']:.2f} ms); host busy {s['host_busy_ms']:.2f} ms over {s['host_ops']} operators")
        for label, v in s["by_category"].items():
            share = 100 * v["ms"] / s["device_ms"] if s["device_ms"] else 0
            print(f"  {label:16s} {v['ms']:9.3f} ms {share:5.1f} %  {v['count']:6d} launches")
        print("  top kernels:")
        for k in s["top_kernels"]:
            print(f"    {k['ms']:9.3f} ms {k['count']:5d}x  {short(k['name'])}")
        m = s["memory"]
        if m:
            print(f"  peak allocated {m['peak_gib']:.3f} GiB at {short(m['at_operator'])}: "
                  f"{m['allocated_before_the_window_gib']:.3f} GiB from before the window, {m['live_in_the_window_gib']:.3f} GiB made in it:")
            for g in m["live_by_operator"]:
                print(f"    {g['mib']:10.2f} MiB {g['count']:5d}x  {g['operator']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summaries, f, indent=1)


if __name__ == "__main__":
    main()
