"""Decode speed of a tiny model on the CPU, torch against JAX in the same
run, and where torch's time goes.

A tiny model (24 layers like the 1.6B, but C = 128) does almost no
arithmetic, so its decode time is the framework's per-step host work:
what a GPU cannot hide at batch 1 either. Each backend runs in its own
process (Keras picks its backend once a process):

    python3 benchmarks/decode_cpu.py

prints a table (tokens/s, ms a token, torch/JAX; torch eager and with
`jit_compile=True`, its compiled decoding step, whose first call's compile
is reported) and, for eager torch, a cProfile split of one generate call:
time in torch's own kernels, in Keras layers' `__call__` machinery, in
`keras.ops` dispatch, and the rest.
"""

import argparse
import json
import os
import subprocess
import sys

TINY_24 = dict(
    vocabulary_size=65536,
    num_layers=24,
    hidden_dim=128,
    intermediate_dim=256,
    head_size=64,
    mix_lora_dim=32,
    decay_lora_dim=64,
)
PROMPT = 16


def measure(new, repeats, jit=False):
    import cProfile
    import pstats
    import time

    import keras
    import numpy as np

    from keras_rwkv import RWKV6Backbone
    from keras_rwkv import RWKV6CausalLM

    keras.utils.set_random_seed(0)
    lm = RWKV6CausalLM(RWKV6Backbone(**TINY_24))
    lm.compile(sampler="greedy", **({"jit_compile": True} if jit else {}))
    ids = np.arange(10, 10 + PROMPT)[None].astype("int32")
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}

    def gen(n):
        lm.generate(inputs, max_new_tokens=n, stop_token_ids=None)

    def timed(fn):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    start = time.perf_counter()
    gen(new)  # compiled / warm
    first_s = time.perf_counter() - start
    lm.prefill(inputs)
    whole = timed(lambda: gen(new))
    read = timed(lambda: lm.prefill(inputs))
    step_s = (whole - read) / new
    result = {
        "backend": keras.config.backend() + (" jit_compile" if jit else ""),
        "first_s": first_s,
        "tok_s": 1 / step_s,
        "ms_token": 1e3 * step_s,
    }
    if keras.config.backend() == "torch" and not jit:
        profiler = cProfile.Profile()
        profiler.enable()
        gen(new)
        profiler.disable()
        result["split"] = split(pstats.Stats(profiler))
    return result


def split(stats):
    """Own time by where it is spent (seconds, and the total)."""
    buckets = {"torch kernels": 0.0, "keras layers": 0.0, "keras ops": 0.0}
    total = 0.0
    for (path, _, name), (_, _, own, _, _) in stats.stats.items():
        total += own
        if path == "~" and "torch" in name:
            buckets["torch kernels"] += own
        elif "keras/src/layers" in path or "keras/src/utils/tracking" in path:
            buckets["keras layers"] += own
        elif "keras/src" in path or "torch/utils/_pytree" in path:
            buckets["keras ops"] += own
    # Builtins (getattr, isinstance, ...) are mostly Keras's, some ours.
    buckets["builtins and our Python"] = total - sum(buckets.values())
    return {k: v / total for k, v in buckets.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=("jax", "torch"))
    parser.add_argument("--jit", action="store_true")
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    # Made before the run: a missing folder must not lose a measurement.
    os.makedirs(args.out, exist_ok=True)
    if args.backend:
        print(json.dumps(measure(args.new, args.repeats, args.jit)))
        return
    rows = []
    for backend, jit in (("jax", []), ("torch", []), ("torch", ["--jit"])):
        env = {**os.environ, "KERAS_BACKEND": backend}
        proc = subprocess.run(
            [sys.executable, __file__, "--backend", backend, *jit]
            + ["--new", str(args.new), "--repeats", str(args.repeats)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    with open(os.path.join(args.out, "decode_cpu.json"), "w") as f:
        json.dump(rows, f, indent=1)
    jax_ms = rows[0]["ms_token"]
    print("| backend | tok/s | ms a token | vs JAX | first generate |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backend']} | {r['tok_s']:,.1f} | {r['ms_token']:.2f} | "
            f"{r['ms_token'] / jax_ms:.1f}x the time | {r['first_s']:.1f} s |"
        )
    for r in rows:
        if "split" in r:
            parts = ", ".join(f"{k} {v:.0%}" for k, v in r["split"].items())
            print(f"\n{r['backend']} decode's host time: {parts}")


if __name__ == "__main__":
    main()
