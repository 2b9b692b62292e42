"""RWKV6 across GPUs with `keras.distribution` (JAX): scaling of
data-parallel training and batch generation, and ModelParallel for 7B.

Figures (random weights, real shapes, bf16):
- data-parallel training of 1.6B at T = 4096 (Adam, batch
  `--batch-per-device` per GPU): tokens/s for n = 1, 2, 4, 8 GPUs (as
  many as there are), and the scaling efficiency, tokens/s at n over
  n x tokens/s on one GPU;
- batch generation of 1.6B under DataParallel (greedy, 16-token
  prompts, `--new-tokens` new tokens, `--gen-batch-per-device` rows per
  GPU): aggregate tokens/s and efficiency likewise;
- ModelParallel for 7B (`RWKV6Backbone.get_layout_map`), mesh (1, n):
  tensor parallelism, weights split over n GPUs: training tokens/s and
  generation tokens/s for every n where it fits (out-of-memory is
  reported, not fatal); efficiency is per-GPU throughput relative to the
  smallest n that fits;
- ModelParallel for 7B with mesh (n, 1): one sequence per GPU with every
  weight, gradient and optimizer state split over the n GPUs (FSDP-like);
  efficiency against one GPU.

Every configuration runs in its own process (fresh memory, its own
`CUDA_VISIBLE_DEVICES`), and the driver prints markdown tables.

    KERAS_BACKEND=jax python3 benchmarks/distribution_gpu.py --out $OUT
    # CPU smoke test on 8 virtual devices, tiny shapes:
    python3 benchmarks/distribution_gpu.py --tiny

Set `--wkv-kernel python|cuda|auto` to pick the WKV implementation (the
tables say which one ran). Training rematerialises every block in the
backward pass (`keras.RematScope`; `--no-remat` to turn it off): without
it the Python WKV path keeps ~75 GiB of activations per 4096-token
sequence of 1.6B (docs/distribution.md), more than one GPU holds.
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

from gpu_profile import format_summary
from gpu_profile import profile
from shapes import RWKV6_1B6
from shapes import RWKV6_7B
from timing import median_seconds

# Official RWKV6 World shapes (DESIGN.md).
SIZES = {"1.6b": RWKV6_1B6, "7b": RWKV6_7B}
# --tiny: CPU-sized stand-ins (8 heads in "7b", so 8-way model parallel
# still splits whole heads).
TINY_SIZES = {
    "1.6b": dict(
        vocabulary_size=256,
        num_layers=2,
        hidden_dim=256,
        intermediate_dim=512,
        head_size=64,
        mix_lora_dim=8,
        decay_lora_dim=16,
    ),
    "7b": dict(
        vocabulary_size=512,
        num_layers=2,
        hidden_dim=512,
        intermediate_dim=1024,
        head_size=64,
        mix_lora_dim=8,
        decay_lora_dim=16,
    ),
}
PROMPT = 16
RESULT = "RESULT "


# --- one configuration (child process) ------------------------------------


def peak_memory_gib(devices):
    peaks = []
    for device in devices:
        try:
            stats = device.memory_stats() or {}
        except Exception:  # CPU devices may not implement it
            stats = {}
        if "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"] / 2**30)
    return max(peaks) if peaks else None


def run_one(config):
    import jax
    import keras
    import numpy as np

    from keras_rwkv import RWKV6Backbone
    from keras_rwkv import RWKV6CausalLM
    from keras_rwkv.ops.wkv6 import resolve_kernel

    n, part = config["n"], config["part"]
    devices = jax.devices()
    if len(devices) < n:
        raise RuntimeError(f"asked for {n} devices, JAX sees {len(devices)}")
    devices = devices[:n]
    keras_devices = keras.distribution.list_devices()[:n]
    mesh_shape = config.get("mesh")
    if mesh_shape:
        mesh = keras.distribution.DeviceMesh(
            tuple(mesh_shape), ("batch", "model"), keras_devices
        )
        distribution = keras.distribution.ModelParallel(
            layout_map=RWKV6Backbone.get_layout_map(mesh),
            batch_dim_name="batch",
        )
        replicas = mesh_shape[0]
    elif n > 1:
        distribution = keras.distribution.DataParallel(devices=keras_devices)
        replicas = n
    else:
        distribution = None  # the one-GPU baseline: no distribution at all
        replicas = 1
    keras.distribution.set_distribution(distribution)

    dims = dict(config["dims"], wkv_kernel=config["wkv_kernel"])
    keras.utils.set_random_seed(0)
    remat = config["part"] == "train" and config["remat"]
    # Rematerialise each block in the backward pass: keeps only the block
    # inputs (2C bytes a token a layer in bf16) instead of ~0.38 KB x C.
    blocks = [f"block_{i}" for i in range(dims["num_layers"])]
    scope = (
        keras.RematScope(mode="list_of_layers", layer_names=blocks)
        if remat
        else contextlib.nullcontext()
    )
    with scope:
        lm = RWKV6CausalLM(RWKV6Backbone(**dims, dtype=config["dtype"]))
    params = sum(int(np.prod(v.shape)) for v in lm.weights)
    rng = np.random.default_rng(0)
    vocab = dims["vocabulary_size"]
    out = {
        "params": params,
        "device_kind": devices[0].device_kind,
        "kernel": resolve_kernel(config["wkv_kernel"]),
    }
    if part == "train":
        batch = config["batch_per_replica"] * replicas
        seq_len = config["seq_len"]
        ids = rng.integers(1, vocab, (batch, seq_len + 1)).astype("int32")
        x = {
            "token_ids": ids[:, :-1],
            "padding_mask": np.ones((batch, seq_len), "int32"),
        }
        y = ids[:, 1:]
        lm.compile(
            optimizer=keras.optimizers.Adam(1e-5),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        # train_on_batch returns numpy logs, so each call is synchronous.
        step = median_seconds(
            lambda: lm.train_on_batch(x, y), config["repeats"], warmup=2
        )
        out.update(batch=batch, tokens=batch * seq_len, seconds=step)
        if config.get("profile"):
            out["profile"] = profile(lambda: lm.train_on_batch(x, y))
    else:
        batch = config["batch_per_replica"] * replicas
        new = config["new_tokens"]
        prompts = {
            "token_ids": rng.integers(1, vocab, (batch, PROMPT)).astype(
                "int32"
            ),
            "padding_mask": np.ones((batch, PROMPT), "int32"),
        }
        lm.compile(sampler="greedy")

        def generate():
            lm.generate(prompts, max_new_tokens=new, stop_token_ids=None)

        seconds = median_seconds(generate, config["repeats"])
        out.update(batch=batch, tokens=batch * new, seconds=seconds)
        if config.get("profile"):
            out["profile"] = profile(generate)
    out["tokens_per_s"] = out["tokens"] / out["seconds"]
    out["peak_gib"] = peak_memory_gib(devices)
    return out


# --- driver -----------------------------------------------------------------


def child_env(n, tiny):
    env = dict(os.environ)
    env["KERAS_BACKEND"] = "jax"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if tiny:
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={n}"
        ).strip()
    else:
        visible = env.get("CUDA_VISIBLE_DEVICES")
        ids = (
            visible.split(",")
            if visible
            else [str(i) for i in range(max(n, 1))]
        )
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[:n])
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    return env


def run_child(config, tiny, timeout):
    try:
        proc = subprocess.run(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--child",
                json.dumps(config),
            ],
            env=child_env(config["n"], tiny),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s", "log": ""}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-20:]
    text = "\n".join(tail)
    oom = "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
    return {"error": "out of memory" if oom else "failed", "log": text}


def device_count(tiny, timeout):
    if tiny:
        return 8
    probe = "import jax; print('COUNT', jax.device_count())"
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("COUNT "):
            return int(line.split()[1])
    raise RuntimeError(f"could not count devices:\n{proc.stderr[-2000:]}")


def prebuild_kernel(timeout):
    """Builds (or finds cached) the CUDA WKV kernel once, before any timed
    child: a cold build takes a minute or two, which would otherwise count
    against the first child's timeout."""
    probe = (
        "from keras_rwkv.ops.wkv6.cuda import availability; "
        "print('KERNEL', *availability('jax'))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        env=child_env(1, tiny=False),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("KERNEL ")]
    print("# " + (lines[-1] if lines else proc.stderr.strip()[-500:]))


def fmt(value, spec):
    return "—" if value is None else format(value, spec)


def print_scaling(title, rows, baseline="one"):
    """`baseline="one"`: efficiency = tps(n) / (n tps(1)); "first": per-
    device throughput relative to the smallest n that ran."""
    print(f"\n### {title}\n")
    print(
        "| devices | mesh (batch, model) | global batch | time (s) | "
        "tokens/s | tokens/s per device | scaling efficiency | "
        "peak GiB / device |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rows = sorted(rows, key=lambda r: r["n"])
    ok = [r for r in rows if "error" not in r["result"]]
    base = None
    if baseline == "one":
        base = next((r for r in ok if r["n"] == 1), None)
    elif ok:
        base = min(ok, key=lambda r: r["n"])
    for row in rows:
        res, n = row["result"], row["n"]
        mesh = row.get("mesh") or ((n, 1) if n > 1 else (1, 1))
        mesh = f"({mesh[0]}, {mesh[1]})"
        if "error" in res:
            print(f"| {n} | {mesh} | — | — | {res['error']} | — | — | — |")
            continue
        eff = None
        if base is not None:
            per_base = base["result"]["tokens_per_s"] / base["n"]
            eff = res["tokens_per_s"] / n / per_base
        print(
            f"| {n} | {mesh} | {res['batch']} | {res['seconds']:.3f} | "
            f"{res['tokens_per_s']:,.0f} | {res['tokens_per_s'] / n:,.0f} | "
            f"{fmt(eff, '.0%')} | {fmt(res['peak_gib'], '.1f')} |"
        )
    if baseline == "first" and base is not None:
        print(
            f"\nEfficiency relative to {base['n']} device(s) (the smallest "
            "configuration that ran)."
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test")
    parser.add_argument(
        "--parts",
        default="train,generate,model_parallel",
        help="comma-separated: train, generate, model_parallel (or only "
        "a part of it: mp_generate, mp_train (mesh (1, n)), mp_fsdp (mesh "
        "(n, 1)))",
    )
    parser.add_argument(
        "--devices", default=None, help="device counts, e.g. 1,2,4,8"
    )
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-per-device", type=int, default=1)
    parser.add_argument("--gen-batch-per-device", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--mp-size", default="7b", choices=sorted(SIZES))
    parser.add_argument("--mp-batch", type=int, default=1)
    parser.add_argument("--mp-gen-batch", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--wkv-kernel", default="auto")
    parser.add_argument(
        "--no-remat",
        dest="remat",
        action="store_false",
        help="keep every activation for the backward pass (training)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="trace one more step per configuration and print where its "
        "GPU time went (kernels by kind)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--out", default=None, help="folder for results.json")
    args = parser.parse_args()

    if args.child:
        result = run_one(json.loads(args.child))
        print(RESULT + json.dumps(result), flush=True)
        return

    sizes = TINY_SIZES if args.tiny else SIZES
    if args.tiny:
        args.seq_len = min(args.seq_len, 64)
        args.batch_per_device = max(args.batch_per_device, 2)
        args.gen_batch_per_device = min(args.gen_batch_per_device, 2)
        args.new_tokens = min(args.new_tokens, 8)
        args.repeats = min(args.repeats, 2)
    available = device_count(args.tiny, args.timeout)
    if not args.tiny and args.wkv_kernel in ("cuda", "auto"):
        prebuild_kernel(args.timeout)
    if args.devices:
        counts = [int(c) for c in args.devices.split(",")]
    else:
        counts = [c for c in (1, 2, 4, 8) if c <= available]
    counts = [c for c in counts if c <= available]
    parts = args.parts.split(",")
    common = dict(
        dtype=args.dtype,
        wkv_kernel=args.wkv_kernel,
        repeats=args.repeats,
        remat=args.remat,
        profile=args.profile,
    )
    report = {"args": vars(args), "available_devices": available}

    def run(part, n, dims, mesh=None, **extra):
        config = dict(common, part=part, n=n, dims=dims, mesh=mesh, **extra)
        t0 = time.perf_counter()
        result = run_child(config, args.tiny, args.timeout)
        wall = time.perf_counter() - t0
        status = result.get("error") or f"{result['tokens_per_s']:,.0f} tok/s"
        print(f"# {part} n={n} mesh={mesh}: {status} ({wall:.0f} s)")
        if "log" in result:
            print("#   " + result["log"].replace("\n", "\n#   "))
        if result.get("profile"):
            print("## profile: " + format_summary(result["profile"]))
        return {"n": n, "mesh": mesh, "result": result}

    if "train" in parts:
        report["train"] = [
            run(
                "train",
                n,
                sizes["1.6b"],
                seq_len=args.seq_len,
                batch_per_replica=args.batch_per_device,
            )
            for n in counts
        ]
    if "generate" in parts:
        report["generate"] = [
            run(
                "generate",
                n,
                sizes["1.6b"],
                new_tokens=args.new_tokens,
                batch_per_replica=args.gen_batch_per_device,
            )
            for n in counts
        ]
    if "model_parallel" in parts:
        parts += ["mp_generate", "mp_train", "mp_fsdp"]
    heads = sizes[args.mp_size]["hidden_dim"] // 64
    mp_counts = [n for n in counts if heads % n == 0]
    if "mp_generate" in parts:
        # Generation first: it compiles faster, training may not fit.
        report["mp_generate"] = [
            run(
                "generate",
                n,
                sizes[args.mp_size],
                mesh=[1, n],
                new_tokens=args.new_tokens,
                batch_per_replica=args.mp_gen_batch,
            )
            for n in mp_counts
        ]
    if "mp_train" in parts:
        report["mp_train"] = [
            run(
                "train",
                n,
                sizes[args.mp_size],
                mesh=[1, n],
                seq_len=args.seq_len,
                batch_per_replica=args.mp_batch,
            )
            # Largest first: one GPU is the configuration that may not fit.
            for n in sorted(mp_counts, reverse=True)
        ]
    if "mp_fsdp" in parts:
        # Mesh (n, 1): one sequence per GPU, every weight (and its gradient
        # and optimizer state) split over the n GPUs and gathered when
        # used. Its one-GPU baseline is mesh (1, 1), the same
        # configuration as ModelParallel's: run it only if that did not.
        done = [r for r in report.get("mp_train", []) if r["n"] == 1]
        report["mp_fsdp"] = done + [
            run(
                "train",
                n,
                sizes[args.mp_size],
                mesh=[n, 1],
                seq_len=args.seq_len,
                batch_per_replica=args.mp_batch,
            )
            for n in counts
            if n > 1 or not done
        ]

    first = next(
        (
            row["result"]
            for rows in report.values()
            if isinstance(rows, list)
            for row in rows
            if "error" not in row["result"]
        ),
        {},
    )
    label = "tiny CPU shapes, " if args.tiny else ""
    print(
        f"\n## RWKV6 with keras.distribution: {label}"
        f"{first.get('device_kind', '?')} x {available}, {args.dtype}, "
        f"WKV kernel {first.get('kernel', '?')}, training "
        f"{'with' if args.remat else 'without'} block remat, median of "
        f"{args.repeats}"
    )
    if "train" in report:
        print_scaling(
            f"Data-parallel training, 1.6B, T={args.seq_len}, "
            f"{args.batch_per_device} sequence(s) per device, Adam",
            report["train"],
        )
    if "generate" in report:
        print_scaling(
            f"Data-parallel batch generation, 1.6B, greedy, prompt "
            f"{PROMPT}, {args.new_tokens} new tokens, "
            f"{args.gen_batch_per_device} rows per device",
            report["generate"],
        )
    if "mp_train" in report:
        print_scaling(
            f"ModelParallel training, {args.mp_size}, T={args.seq_len}, "
            f"batch {args.mp_batch}, Adam",
            report["mp_train"],
            baseline="first",
        )
    if "mp_fsdp" in report:
        print_scaling(
            f"ModelParallel training with the weights split over the batch "
            f"axis (FSDP-like), {args.mp_size}, T={args.seq_len}, "
            f"{args.mp_batch} sequence(s) per device, Adam",
            report["mp_fsdp"],
        )
    if "mp_generate" in report:
        print_scaling(
            f"ModelParallel generation, {args.mp_size}, greedy, batch "
            f"{args.mp_gen_batch}, {args.new_tokens} new tokens",
            report["mp_generate"],
            baseline="first",
        )
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "distribution_results.json")
        with open(path, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
