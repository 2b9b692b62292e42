"""The torch backend on one GPU next to JAX, same call: decode at batch 1
and 64, and a state-tuning step (random RWKV6 1.6B, bfloat16).

Each run is its own process (Keras picks its backend once a process):

    python3 benchmarks/torch_gpu.py --run jax --out $OUT
    python3 benchmarks/torch_gpu.py --run torch-eager --out $OUT
    python3 benchmarks/torch_gpu.py --run torch-jit --out $OUT
    python3 benchmarks/torch_gpu.py --run torch-graphs --out $OUT
    python3 benchmarks/torch_gpu.py --summary --out $OUT

`torch-jit` is `lm.compile(jit_compile=True)` (the compiled decoding step
of `rwkv6_torch_step.py`; for training, Keras's `torch.compile` of the
train step); `torch-graphs` the same step replayed as CUDA graphs
(`KERAS_RWKV_TORCH_STEP_MODE=reduce-overhead`). `--part decode|train`
runs one half. Figures: decode tokens/s (greedy, 16-token prompt, `--new`
tokens, end to end, median of `--repeats` after a warm-up that compiles),
the first call's seconds, the first 32 tokens (prompt and greedy output,
to compare runs), and the state-tuning step (WKV + token-shift states,
Adam, context 1024, batch 1) time and peak GPU memory.
"""

import argparse
import contextlib
import fcntl
import json
import os
import time

from shapes import RWKV6_1B6

DIMS = dict(RWKV6_1B6)
PROMPT = 16
RUNS = ("jax", "torch-eager", "torch-jit", "torch-graphs")
LOCK = {"path": None}


@contextlib.contextmanager
def gpu_turn():
    """With `--lock FILE`, runs started together compile at once but take
    turns on the GPU for what is timed."""
    if LOCK["path"] is None:
        yield
        return
    with open(LOCK["path"], "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def setup(run):
    os.environ["KERAS_BACKEND"] = "jax" if run == "jax" else "torch"
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if run == "torch-graphs":
        os.environ["KERAS_RWKV_TORCH_STEP_MODE"] = "reduce-overhead"


def sync(x=None):
    import keras

    if keras.config.backend() == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    elif x is not None:
        import jax

        jax.block_until_ready(x)


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def build(run, train=False):
    import keras

    from keras_rwkv import RWKV6Backbone
    from keras_rwkv import RWKV6CausalLM

    keras.utils.set_random_seed(0)
    lm = RWKV6CausalLM(RWKV6Backbone(**DIMS, dtype="bfloat16"))
    jit = {"jit_compile": True} if run in ("torch-jit", "torch-graphs") else {}
    if train:
        lm.enable_state_tuning(time_shift=True)
        lm.compile(optimizer=keras.optimizers.Adam(1e-3), **jit)
    else:
        lm.compile(sampler="greedy", **jit)
    return lm


def bench_decode(run, new, repeats, batches):
    import numpy as np

    lm = build(run)
    rng = np.random.default_rng(0)
    result = {}
    for batch in batches:
        ids = rng.integers(1, 65529, (batch, PROMPT)).astype("int32")
        inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}

        def gen(inputs=inputs):
            return lm.generate(inputs, max_new_tokens=new, stop_token_ids=None)

        start = time.perf_counter()
        out = gen()
        result[f"first_s_b{batch}"] = time.perf_counter() - start
        if batch == 1:
            result["tokens_b1"] = [int(t) for t in out["token_ids"][0][:32]]
        with gpu_turn():
            seconds = median_time(gen, repeats)
        result[f"decode_b{batch}"] = batch * new / seconds
        print(run, batch, result, flush=True)
    return result


def bench_train(run, steps, context):
    import keras
    import numpy as np

    lm = build(run, train=True)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 65529, (1, context + 1))
    x = {
        "token_ids": ids[:, :-1].astype("int32"),
        "padding_mask": np.ones((1, context), "int32"),
    }
    y = ids[:, 1:].astype("int32")
    start = time.perf_counter()
    lm.train_on_batch(x, y)
    sync()
    result = {"train_first_s": time.perf_counter() - start}
    with gpu_turn():
        step = median_time(lambda: lm.train_on_batch(x, y), steps)
    if keras.config.backend() == "torch":
        import torch

        peak = (
            torch.cuda.max_memory_allocated()
            if torch.cuda.is_available()
            else 0
        )
    else:
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        peak = stats.get("peak_bytes_in_use", 0)
    result.update(train_step_ms=step * 1e3, train_peak_gib=peak / 2**30)
    return result


def device_name():
    import keras

    if keras.config.backend() == "torch":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
        return "cpu"
    import jax

    return jax.devices()[0].device_kind


def summary(out_dir):
    rows = {}
    for run in RUNS:
        path = os.path.join(out_dir, f"torch_gpu_{run}.json")
        if os.path.exists(path):
            with open(path) as f:
                rows[run] = json.load(f)
    eager_row = rows.get("torch-eager", {})
    print(f"# card: {next((r['device'] for r in rows.values()), '?')}")
    keys = (
        "decode_b1",
        "decode_b64",
        "first_s_b1",
        "first_s_b64",
        "train_step_ms",
        "train_peak_gib",
        "train_first_s",
    )
    print("| run | " + " | ".join(keys) + " | greedy = torch eager (of 32) |")
    print("|---" * (len(keys) + 2) + "|")
    for run, row in rows.items():
        cells = []
        for key in keys:
            value = row.get(key)
            cells.append("-" if value is None else f"{value:,.1f}")
        same = "-"
        if "tokens_b1" in row and "tokens_b1" in eager_row:
            pairs = zip(row["tokens_b1"], eager_row["tokens_b1"])
            same = str(sum(a == b for a, b in pairs))
        print(f"| {run} | " + " | ".join(cells) + f" | {same} |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", choices=RUNS)
    parser.add_argument("--part", choices=("decode", "train", "both"))
    parser.add_argument("--summary", action="store_true")
    parser.add_argument("--out", default=".")
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--lock", help="a file runs share to take turns")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test")
    args = parser.parse_args()
    LOCK["path"] = args.lock
    if args.summary:
        summary(args.out)
        return
    setup(args.run)
    batches = [int(b) for b in args.batches.split(",")]
    if args.tiny:
        DIMS.update(num_layers=2, hidden_dim=128, intermediate_dim=256)
    result = {"device": device_name()}
    part = args.part or "both"
    if part in ("decode", "both"):
        result.update(bench_decode(args.run, args.new, args.repeats, batches))
    if part in ("train", "both"):
        result.update(bench_train(args.run, args.steps, args.context))
    print(json.dumps(result), flush=True)
    path = os.path.join(args.out, f"torch_gpu_{args.run}.json")
    with gpu_turn():  # parts run in separate processes add up
        if os.path.exists(path):
            with open(path) as f:
                result = {**json.load(f), **result}
        with open(path, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
