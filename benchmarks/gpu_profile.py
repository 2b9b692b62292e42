"""Where one call's GPU time goes: traces it with the JAX profiler and sums
the kernels of every GPU stream by kind (matmul, collective, WKV, other).

Reads the Perfetto (Chrome trace format) file that
`jax.profiler.start_trace(..., create_perfetto_trace=True)` writes, so it
needs nothing beyond JAX.
"""

import glob
import gzip
import json
import os
import sys
import tempfile

# Substrings of kernel names (lower case), first match wins.
KINDS = (
    ("wkv", ("wkv",)),
    ("matvec", ("matvec",)),
    ("collective", ("nccl", "all-reduce", "all-gather", "reduce-scatter")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_")),
    ("copy", ("memcpy", "memset")),
)


# What each card copies at (bytes/s, measured device-to-device copies:
# benchmarks/RESULTS.md), the ceiling the decode and matvec scripts report
# against; `--bandwidth` overrides it.
COPY_RATE = {"H100": 3.0e12, "H200": 4.3e12}


def copy_rate(device_kind, given=None):
    """`given` if set, else the copy rate of the card named `device_kind`
    (4.3e12 for one not in `COPY_RATE`, with a note on stderr)."""
    if given:
        return given
    for card, rate in COPY_RATE.items():
        if card in device_kind:
            return rate
    print(
        f"no copy rate known for {device_kind!r}: using 4.3e12 bytes/s; "
        "give the card's with --bandwidth",
        file=sys.stderr,
    )
    return 4.3e12


def kind_of(name):
    lower = name.lower()
    for kind, keys in KINDS:
        if any(key in lower for key in keys):
            return kind
    return "other"


def summarize(events, top=8):
    """Per GPU: the time each kind of kernel took (ms, summed over
    streams), the span from first kernel start to last kernel end, the
    number of kernels, the time at least one kernel ran (busy), and the
    biggest kernels as (name, ms, launches) (`top` overall, then `top` of
    kind "other")."""
    process, thread = {}, {}
    for e in events:
        if e.get("ph") != "M":
            continue
        if e.get("name") == "process_name":
            process[e["pid"]] = e["args"]["name"]
        elif e.get("name") == "thread_name":
            thread[(e["pid"], e["tid"])] = e["args"]["name"]
    per_gpu = {}
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        pname = process.get(e["pid"], "")
        tname = thread.get((e["pid"], e.get("tid")), "")
        # Raw kernels live on the "Stream #..." lines; the "XLA Ops" lines
        # repeat them per HLO op.
        if "GPU" not in pname or not tname.startswith("Stream"):
            continue
        gpu = per_gpu.setdefault(
            pname, {"spans": [], "names": {}, "counts": {}}
        )
        gpu["spans"].append((e["ts"], e["ts"] + e["dur"]))
        gpu["names"][e["name"]] = gpu["names"].get(e["name"], 0.0) + e["dur"]
        gpu["counts"][e["name"]] = gpu["counts"].get(e["name"], 0) + 1
    out = {}
    for pname, gpu in sorted(per_gpu.items()):
        kinds = {}
        for name, us in gpu["names"].items():
            kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + us / 1e3
        spans = sorted(gpu["spans"])
        busy, end = 0.0, float("-inf")
        for a, b in spans:  # union of the kernel intervals
            if b > end:
                busy += b - max(a, end)
                end = b
        ranked = sorted(gpu["names"].items(), key=lambda kv: -kv[1])
        biggest = ranked[:top]
        # XLA's own fusions are the part a layout change moves; list more.
        biggest += [kv for kv in ranked if kind_of(kv[0]) == "other"][:top]
        biggest = list(dict(biggest).items())
        out[pname] = {
            "span_ms": (spans[-1][1] - spans[0][0]) / 1e3,
            "kernels": len(spans),
            "busy_ms": busy / 1e3,
            "kinds_ms": {k: round(v, 3) for k, v in sorted(kinds.items())},
            "top": [
                (name[:90], round(us / 1e3, 3), gpu["counts"][name])
                for name, us in biggest
            ],
        }
    return out


def profile(fn, top=12):
    """Runs `fn` once under the JAX profiler; returns `summarize`'s dict."""
    import jax

    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder, create_perfetto_trace=True)
        try:
            fn()
        finally:
            jax.profiler.stop_trace()
        paths = glob.glob(
            os.path.join(folder, "**", "perfetto_trace.json.gz"),
            recursive=True,
        )
        if not paths:
            return {}
        with gzip.open(paths[0]) as f:
            data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return summarize(events, top)


def format_summary(summary):
    lines = []
    for pname, s in summary.items():
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in s["kinds_ms"].items())
        lines.append(
            f"{pname}: span {s['span_ms']:.1f} ms, busy {s['busy_ms']:.1f} ms"
            f"; kernel ms by kind: {kinds}"
        )
        for name, ms, count in s["top"]:
            lines.append(f"    {ms:8.2f} ms {count:6d}x  {name}")
    return "\n".join(lines)
