"""The torch backend on one GPU next to JAX, same call: decode at batch 1
and 64, and a state-tuning step (random RWKV6 1.6B, bfloat16).

Each run is its own process (Keras picks its backend once a process):

    python3 benchmarks/torch_gpu.py --run jax --out $OUT
    python3 benchmarks/torch_gpu.py --run torch-eager --out $OUT
    python3 benchmarks/torch_gpu.py --run torch-jit --out $OUT
    python3 benchmarks/torch_gpu.py --run torch-graphs --out $OUT
    python3 benchmarks/torch_gpu.py --summary --out $OUT

Runs started together with `--barrier DIR:N --lock FILE` all compile
first, then take turns on the GPU, so that no timing overlaps another
run's compiling (which slows the host-bound ones).

`torch-jit` is `lm.compile(jit_compile=True)` (the compiled decoding step
of `rwkv6_torch_step.py`, on a GPU one CUDA graph; for training, the
forward pass traced and compiled by `rwkv6_torch_forward.py`);
`torch-graphs` the same with `KERAS_RWKV_TORCH_STEP_MODE=reduce-overhead`
said outright; `torch-trace` with `KERAS_RWKV_TORCH_TRAIN_MODE=trace` (the
training forward traced, not compiled); `torch-train-graphs` with
`KERAS_RWKV_TORCH_TRAIN_MODE=reduce-overhead` (torch's CUDA graphs). `--profile`
writes torch profiler tables of one timed call (`profile_*.txt`), and
where it waits for the GPU (`syncs_*.txt`).
`--part decode|train` runs one half. Figures: decode tokens/s (greedy,
16-token prompt, `--new` tokens, end to end, median of `--repeats` after
a warm-up that compiles), the first call's seconds, the first 32 tokens
(prompt and greedy output, to compare runs), and the state-tuning step
(WKV + token-shift states, Adam, context 1024, batch 1) time and peak GPU
memory; `--tune lora|full` times rank-8 LoRA or a full fine-tune instead
(one per process, keys `lora_*`, `full_*`).
"""

import argparse
import contextlib
import fcntl
import functools
import json
import os
import time

from shapes import RWKV6_1B6

DIMS = dict(RWKV6_1B6)
PROMPT = 16
RUNS = (
    "jax",
    "torch-eager",
    "torch-jit",
    "torch-graphs",
    "torch-trace",
    "torch-train-graphs",
)
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
    if run == "torch-trace":
        os.environ["KERAS_RWKV_TORCH_TRAIN_MODE"] = "trace"
    if run == "torch-train-graphs":
        os.environ["KERAS_RWKV_TORCH_TRAIN_MODE"] = "reduce-overhead"


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


def build(run, train=None):
    """`train`: None for decoding, else what trains: "state" (the WKV and
    token-shift states), "lora" (rank-8 LoRA) or "full" (every weight)."""
    import keras

    from keras_rwkv import RWKV6Backbone
    from keras_rwkv import RWKV6CausalLM

    keras.utils.set_random_seed(0)
    lm = RWKV6CausalLM(RWKV6Backbone(**DIMS, dtype="bfloat16"))
    jit = {"jit_compile": True} if run.startswith("torch-") else {}
    if run == "torch-eager":
        jit = {}
    if train == "state":
        lm.enable_state_tuning(time_shift=True)
    elif train == "lora":
        lm.backbone.enable_lora(8)
    if train:
        lm.compile(optimizer=keras.optimizers.Adam(1e-3), **jit)
    else:
        lm.compile(sampler="greedy", **jit)
    return lm


def profile(fn, out_dir, name, rows=25):
    """torch profiler tables of one `fn()` (after warm-up) into
    `out_dir/name.txt`: the top ops by self host time and by device time,
    and the totals (wall, host ops, kernels and their time)."""
    import keras

    if keras.config.backend() != "torch":
        return
    import torch
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        sync(fn())
        wall = time.perf_counter() - start
    events = prof.key_averages()
    kernels = [e for e in events if "CUDA" in str(e.device_type)]
    device_ms = sum(e.self_device_time_total for e in kernels) / 1e3
    lines = [
        f"# {name}: wall {wall * 1e3:.1f} ms (profiled)",
        f"kernels: {sum(e.count for e in kernels)}, "
        f"device time {device_ms:.1f} ms",
        events.table(sort_by="self_cpu_time_total", row_limit=rows),
    ]
    if torch.cuda.is_available():
        lines.append(
            events.table(sort_by="self_cuda_time_total", row_limit=rows)
        )
    with open(os.path.join(out_dir, f"{name}.txt"), "w") as f:
        f.write("\n".join(lines))
    print(lines[0], lines[1], flush=True)


def find_syncs(fn, out_dir, name):
    """Where one `fn()` makes the host wait for the GPU: torch's sync
    debug mode warns at each synchronizing op, and each warning's Python
    stack is counted, into `out_dir/name.txt`."""
    import collections
    import traceback
    import warnings

    import keras

    if keras.config.backend() != "torch":
        return
    import torch

    if not torch.cuda.is_available():
        return
    stacks = collections.Counter()
    shown = warnings.showwarning

    def record(message, *args, **kwargs):
        frames = traceback.extract_stack()[:-2]
        ours = [f for f in frames if "site-packages/torch" not in f.filename]
        stacks[
            " <- ".join(
                f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}"
                for f in ours[::-1][:8]
            )
        ] += 1

    warnings.showwarning = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                sync(fn())
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        warnings.showwarning = shown
    lines = [f"# {name}: {sum(stacks.values())} syncs"]
    lines += [f"{n} {stack}" for stack, n in stacks.most_common()]
    with open(os.path.join(out_dir, f"{name}.txt"), "w") as f:
        f.write("\n".join(lines))
    print(lines[0], flush=True)


def prepare_decode(run, new, repeats, batches, out_dir=None):
    """Builds and warms up (compiles) decoding for every batch size;
    returns `(result, timed)`, `timed()` adding the timed figures."""
    import keras
    import numpy as np

    lm = build(run)
    rng = np.random.default_rng(0)
    result, gens = {}, {}
    for batch in batches:
        ids = rng.integers(1, 65529, (batch, PROMPT)).astype("int32")
        inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}

        def gen(inputs=inputs, new=new):
            return lm.generate(inputs, max_new_tokens=new, stop_token_ids=None)

        start = time.perf_counter()
        out = gen()
        result[f"first_s_b{batch}"] = time.perf_counter() - start
        if batch == 1:
            result["tokens_b1"] = [int(t) for t in out["token_ids"][0][:32]]
        gens[batch] = gen
    # On torch one new token is the prompt's read and one step (the step
    # program is shared; JAX would compile another loop for it).
    reads = keras.config.backend() == "torch"

    def timed():
        for batch, gen in gens.items():
            seconds = median_time(gen, repeats)
            result[f"decode_b{batch}"] = batch * new / seconds
            if reads:
                one = median_time(functools.partial(gen, new=1), repeats)
                result[f"one_token_ms_b{batch}"] = one * 1e3
                result[f"step_ms_b{batch}"] = (seconds - one) / (new - 1) * 1e3
            print(run, batch, result, flush=True)
            if out_dir:
                profile(gen, out_dir, f"profile_decode_{run}_b{batch}")
                find_syncs(gen, out_dir, f"syncs_decode_{run}_b{batch}")

    return result, timed


def prepare_train(run, steps, context, tune="state", out_dir=None):
    """Builds and warms up (compiles) a training step (`tune` as in
    `build`); returns `(result, timed)` like `prepare_decode`. Its keys
    start `train_` for state tuning, else `lora_` or `full_`."""
    import keras
    import numpy as np

    lm = build(run, train=tune)
    key = "train" if tune == "state" else tune
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 65529, (1, context + 1))
    x = {
        "token_ids": ids[:, :-1].astype("int32"),
        "padding_mask": np.ones((1, context), "int32"),
    }
    y = ids[:, 1:].astype("int32")
    start = time.perf_counter()
    loss = lm.train_on_batch(x, y)[0]
    sync()
    result = {
        f"{key}_first_s": time.perf_counter() - start,
        f"{key}_loss": loss,
    }

    def timed():
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
        result[f"{key}_step_ms"] = step * 1e3
        result[f"{key}_peak_gib"] = peak / 2**30
        # The same step in `fit` (Keras's own loop over ready arrays; its
        # logs are read on another thread, not after every step).
        rows = {k: np.repeat(v, steps, axis=0) for k, v in x.items()}
        fit = lambda: keras.Model.fit(  # noqa: E731
            lm, rows, np.repeat(y, steps, axis=0), batch_size=1, verbose=0
        )
        fit()  # Keras builds its loop once
        start = time.perf_counter()
        fit()
        sync()
        result[f"{key}_fit_step_ms"] = (
            (time.perf_counter() - start) / steps * 1e3
        )
        if out_dir:
            train = lambda: lm.train_on_batch(x, y)  # noqa: E731
            profile(train, out_dir, f"profile_{key}_{run}")
            find_syncs(train, out_dir, f"syncs_{key}_{run}")

    return result, timed


def barrier(spec):
    """`--barrier DIR:N`: waits until N runs have reached it, so that no
    run's timing overlaps another's compiling."""
    if not spec:
        return
    folder, count = spec.rsplit(":", 1)
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, str(os.getpid())), "w").close()
    deadline = time.time() + 900
    while len(os.listdir(folder)) < int(count) and time.time() < deadline:
        time.sleep(0.5)


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
        "one_token_ms_b1",
        "step_ms_b1",
        "step_ms_b64",
        "train_step_ms",
        "train_peak_gib",
        "train_first_s",
        "train_loss",
        "train_fit_step_ms",
        "lora_step_ms",
        "lora_fit_step_ms",
        "lora_peak_gib",
        "full_step_ms",
        "full_peak_gib",
        "full_fit_step_ms",
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
    parser.add_argument("--barrier", help="DIR:N, see barrier()")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test")
    parser.add_argument(
        "--tune",
        choices=("state", "lora", "full"),
        default="state",
        help="what the train part trains",
    )
    parser.add_argument(
        "--profile", action="store_true", help="torch profiler tables"
    )
    args = parser.parse_args()
    LOCK["path"] = args.lock
    if args.summary:
        summary(args.out)
        return
    setup(args.run)
    os.makedirs(args.out, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    if args.tiny:
        DIMS.update(num_layers=2, hidden_dim=128, intermediate_dim=256)
    result = {"device": device_name()}
    part = args.part or "both"
    profiled = args.out if args.profile else None
    prepared = []
    if part in ("decode", "both"):
        prepared.append(
            prepare_decode(args.run, args.new, args.repeats, batches, profiled)
        )
    if part in ("train", "both"):
        prepared.append(
            prepare_train(
                args.run, args.steps, args.context, args.tune, profiled
            )
        )
    barrier(args.barrier)
    with gpu_turn():
        for part_result, timed in prepared:
            timed()
            result.update(part_result)
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
