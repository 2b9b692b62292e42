"""The building blocks of a decode step (T = 1), timed alone on one GPU
(JAX), each in the forms XLA might be given: which lowering reaches the
card's bandwidth.

Each case chains `--chain` copies of one op in a single jitted program
(every copy depends on the one before, so none is hoisted or merged),
profiles one run and reports per copy: the kernel time, the effective time
(span of the whole chain / copies, so launch gaps count), the bytes the op
must read and the bandwidth that makes.

    python3 benchmarks/step_ops_gpu.py --out $OUT
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# (name, K, N): the decode step's matrices for RWKV6 1.6B.
MATRICES = (
    ("att C x C", 2048, 2048),
    ("ffn key C x F", 2048, 7168),
    ("ffn value F x C", 7168, 2048),
    ("head C x V", 2048, 65536),
)


def dot_cases(jnp, lax, rng, k, n):
    """{name: (fn(x, w) -> y [1, n], w, bytes)}."""
    w = jnp.asarray(rng.standard_normal((k, n)) * k**-0.5, jnp.bfloat16)
    w_t = jnp.asarray(w.T)
    w8 = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
    scale = jnp.full((n,), 1e-3, jnp.bfloat16)
    nbytes = k * n * 2

    def m1(x, w):
        return x @ w

    def m2(x, w):
        x2 = jnp.concatenate([x, jnp.zeros_like(x)], axis=0)
        return (x2 @ w)[:1]

    def m8(x, w):
        x8 = jnp.concatenate([x, jnp.zeros((7, k), x.dtype)], axis=0)
        return (x8 @ w)[:1]

    def f32acc(x, w):
        return lax.dot_general(
            x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        ).astype(jnp.bfloat16)

    def transposed(x, w_t):
        return lax.dot_general(x, w_t, (((1,), (1,)), ((), ())))

    def int8_m1(x, w8):
        return (x @ w8.astype(jnp.bfloat16)) * scale

    def int8_m2(x, w8):
        x2 = jnp.concatenate([x, jnp.zeros_like(x)], axis=0)
        return ((x2 @ w8.astype(jnp.bfloat16)) * scale)[:1]

    return {
        "M=1 (as the step is)": (m1, w, nbytes),
        "M=1 padded to 2": (m2, w, nbytes),
        "M=1 padded to 8": (m8, w, nbytes),
        "M=1 f32 accumulate": (f32acc, w, nbytes),
        "M=1 weight stored [N, K]": (transposed, w_t, nbytes),
        "int8 weight, M=1": (int8_m1, w8, nbytes // 2),
        "int8 weight, M=1 padded to 2": (int8_m2, w8, nbytes // 2),
    }


def chain_dot(jax, jnp, fn, k, n, copies):
    @jax.jit
    def run(x, w):
        acc = jnp.zeros((), jnp.float32)
        for _ in range(copies):
            y = fn(x + (acc * 1e-9).astype(x.dtype), w)
            acc = acc + y[0, 0].astype(jnp.float32)
        return acc

    return run


def kernel_ms(summary):
    gpu = next(iter(summary.values()), None)
    if not gpu:
        return 0.0, 0.0, 0
    return sum(gpu["kinds_ms"].values()), gpu["span_ms"], gpu["kernels"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--chain", type=int, default=48)
    parser.add_argument(
        "--bandwidth", type=float, help="bytes/s; default: the card's"
    )
    args = parser.parse_args()
    # Made before the run: a missing folder must not lose a measurement.
    os.makedirs(args.out, exist_ok=True)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from gpu_profile import copy_rate
    from gpu_profile import profile
    from jax import lax

    rng = np.random.default_rng(0)
    rows = []
    copies = args.chain
    for label, k, n in MATRICES:
        x = jnp.asarray(rng.standard_normal((1, k)), jnp.bfloat16)
        for case, (fn, w, nbytes) in dot_cases(jnp, lax, rng, k, n).items():
            run = chain_dot(jax, jnp, fn, k, n, copies)
            jax.block_until_ready(run(x, w))
            summary = profile(
                lambda run=run, x=x, w=w: jax.block_until_ready(run(x, w))
            )
            kern, span, count = kernel_ms(summary)
            rows.append((label, case, kern, span, count, nbytes))
    device = jax.devices()[0].device_kind
    lines = [
        f"# card: {device}, jax {jax.__version__}, {copies} chained copies",
        "| matrix | form | kernels/op | kernel µs/op | effective µs/op "
        "| bytes | effective TB/s | of the ceiling |",
        "|---|---|---|---|---|---|---|---|",
    ]
    bandwidth = copy_rate(device, args.bandwidth)
    for label, case, kern, span, count, nbytes in rows:
        per_kern = kern / copies * 1e3
        per_eff = span / copies * 1e3
        tbs = nbytes / (per_eff * 1e-6) / 1e12 if per_eff else 0
        lines.append(
            f"| {label} | {case} | {count / copies:.1f} | {per_kern:.1f} | "
            f"{per_eff:.1f} | {nbytes / 1e6:.1f} MB | {tbs:.2f} | "
            f"{tbs * 1e12 / bandwidth:.0%} |"
        )
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.out, "step_ops.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "step_ops.json"), "w") as f:
        json.dump(rows, f)


if __name__ == "__main__":
    main()
