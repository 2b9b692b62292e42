"""Chunked-parallel vs step-by-step Python WKV6 on this machine's CPU.

The anchor is the plain recurrence (one `wkv6_step` per token inside a
compiled `keras.ops.scan`), measured in the same run; we report the
chunked form's speed-up over it, forward and forward + backward (the
gradient of every input, as training and state tuning need).

    KERAS_BACKEND=jax python benchmarks/wkv_python_cpu.py
"""

import argparse
import datetime
import os
import platform
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from keras_rwkv.ops.wkv6.python import wkv6_chunked  # noqa: E402
from keras_rwkv.ops.wkv6.python import wkv6_step  # noqa: E402


def step_by_step(r, k, v, log_w, u, state):
    def body(s, inputs):
        rt, kt, vt, wt = (x[:, None] for x in inputs)
        y, s = wkv6_step(rt, kt, vt, wt, u, s)
        return s, y[:, 0]

    xs = tuple(ops.moveaxis(x, 1, 0) for x in (r, k, v, log_w))
    state, ys = ops.scan(body, state, xs)
    return ops.moveaxis(ys, 0, 1), state


def compile_fn(fn):
    if keras.config.backend() == "jax":
        import jax

        return jax.jit(fn)
    return fn


def with_backward(fn):
    """fwd + bwd: the gradients of sum(y) + sum(state) w.r.t. all inputs."""

    def loss(*args):
        y, s = fn(*args)
        return ops.sum(y) + ops.sum(s)

    if keras.config.backend() == "jax":
        import jax

        grad = jax.jit(jax.grad(loss, argnums=tuple(range(6))))
        return lambda *a: grad(*a)
    import torch

    def run(*args):
        args = [a.detach().requires_grad_(True) for a in args]
        return torch.autograd.grad(loss(*args), args)

    return run


def timeit(fn, args, repeats):
    out = fn(*args)  # warm-up / compile
    ops.convert_to_numpy(out[0])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args)
        ops.convert_to_numpy(out[0])
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="256,512,1024,2048,4096")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    b, h, n = args.batch, args.heads, args.head_size
    rng = np.random.default_rng(0)
    variants = {
        "fwd": (compile_fn(step_by_step), compile_fn(wkv6_chunked)),
        "fwd+bwd": (with_backward(step_by_step), with_backward(wkv6_chunked)),
    }
    cpu = platform.processor() or platform.machine()
    print(
        f"# {datetime.date.today()} {cpu} {os.cpu_count()} cores, "
        f"backend {keras.config.backend()}, "
        f"B={b} H={h} N={n} float32, median of {args.repeats}"
    )
    print("| pass | T | step-by-step (anchor) ms | chunked ms | speed-up |")
    print("|---|---|---|---|---|")
    for t in [int(x) for x in args.lengths.split(",")]:
        r, k, v = (
            ops.convert_to_tensor(
                rng.standard_normal((b, t, h, n)).astype("float32")
            )
            for _ in range(3)
        )
        log_w = ops.convert_to_tensor(
            -np.exp(rng.uniform(-6, 1, (b, t, h, n))).astype("float32")
        )
        u = ops.convert_to_tensor(rng.standard_normal((h, n)).astype("float32"))
        s0 = ops.zeros((b, h, n, n))
        inputs = (r, k, v, log_w, u, s0)
        for name, (stepped, chunked) in variants.items():
            t_step = timeit(stepped, inputs, args.repeats)
            t_chunk = timeit(chunked, inputs, args.repeats)
            print(
                f"| {name} | {t} | {t_step * 1e3:.1f} | "
                f"{t_chunk * 1e3:.1f} | {t_step / t_chunk:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
