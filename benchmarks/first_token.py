"""Time to first token as a user meets it: whole `keras-rwkv generate`
processes (interpreter start, imports, model load, compile, one token),
with a fresh cache at the start, then again with the cache warm. The
anchor is the first (cold) process of the same run; the cache off is
shown too.

    python3 benchmarks/first_token.py --model tiny            # CPU
    python3 benchmarks/first_token.py --model 1.6b --dtype bfloat16  # GPU

A random model of the given shape is saved as a preset first (untimed).
Each process runs `python -m keras_rwkv generate --max-new-tokens 1` with
`--verbose`, so its own timings and compilation-cache counts are kept.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from shapes import RWKV6_1B6

MODELS = {
    "tiny": dict(
        vocabulary_size=65536,
        num_layers=2,
        hidden_dim=64,
        intermediate_dim=128,
        head_size=32,
        mix_lora_dim=4,
        decay_lora_dim=8,
    ),
    "1.6b": RWKV6_1B6,
}


def make_preset(model, dtype, path):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    from keras_rwkv import RWKV6Backbone
    from keras_rwkv import RWKV6Tokenizer

    keras.utils.set_random_seed(0)
    backbone = RWKV6Backbone(**MODELS[model], dtype=dtype)
    backbone.save_to_preset(path)
    RWKV6Tokenizer().save_to_preset(path)


def one_process(preset, cache, extra_env):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("KERAS_BACKEND", "KERAS_RWKV_COMPILATION_CACHE")
    }
    env.update(KERAS_RWKV_CACHE=cache, **extra_env)
    args = [sys.executable, "-m", "keras_rwkv", "generate", "--preset"]
    args += [preset, "--max-new-tokens", "1", "--seed", "0", "-v", "Hello"]
    started = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    counts = re.search(r"(\d+) programs loaded, (\d+) compiled", proc.stderr)
    first = re.search(r"first token after ([\d.]+) s", proc.stderr)
    loaded = re.search(r"loaded .* in ([\d.]+) s", proc.stderr)
    return {
        "wall": wall,
        "load": float(loaded[1]) if loaded else None,
        "generate": float(first[1]) if first else None,
        "cache": f"{counts[1]} loaded / {counts[2]} compiled"
        if counts
        else "off",
    }


def row(name, r):
    load = f"{r['load']:.1f}" if r["load"] is not None else "-"
    gen = f"{r['generate']:.2f}" if r["generate"] is not None else "-"
    return f"| {name} | {r['wall']:.1f} | {load} | {gen} | {r['cache']} |"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--warm-runs", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        preset = os.path.join(tmp, "preset")
        make_preset(args.model, args.dtype, preset)
        cache = os.path.join(tmp, "cache")
        cold = one_process(preset, cache, {})
        warm = [one_process(preset, cache, {}) for _ in range(args.warm_runs)]
        off = one_process(preset, cache, {"KERAS_RWKV_COMPILATION_CACHE": "0"})
    median = sorted(warm, key=lambda r: r["wall"])[len(warm) // 2]
    print(f"model {args.model} {args.dtype}; seconds (wall: whole process)")
    print("| process | wall | load | generate to 1st token | cache |")
    print("|---|---|---|---|---|")
    print(row("first (fresh cache)", cold))
    print(row(f"later (median of {len(warm)})", median))
    print(row("cache off", off))
    walls = [r["wall"] for r in warm]
    print(
        f"later / first: {median['wall'] / cold['wall']:.2f} "
        f"(later walls {', '.join(f'{w:.1f}' for w in walls)}; "
        f"stdev {statistics.pstdev(walls):.2f})"
    )


if __name__ == "__main__":
    main()
