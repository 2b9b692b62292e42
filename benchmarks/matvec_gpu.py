"""The decoding-step kernel (`keras_rwkv.ops.matvec`) against XLA, per
launch, on one GPU (JAX): the matrices of a RWKV6 1.6B step.

Each case chains `--chain` launches in one jitted program (each depends on
the one before), profiles one run and reports per launch: kernel time,
effective time (the chain's span / launches, so gaps count), the weight
bytes read and the bandwidth that makes, against `--bandwidth`. The chain
cycles through enough distinct copies of the weights (`--working-set`
bytes) that they come from memory, not from the L2 cache, as in a model.

    python3 benchmarks/matvec_gpu.py --out $OUT [--label new]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

C, F, V = 2048, 7168, 65536
# (name, [(K, N), ...] in one launch)
CASES = (
    ("C x C", [(C, C)]),
    ("r, k, v, g: 4 x C x C", [(C, C)] * 4),
    ("ffn key + receptance: C x F, C x C", [(C, F), (C, C)]),
    ("ffn value F x C", [(F, C)]),
    ("head C x V", [(C, V)]),
)


def operands(jnp, rng, shapes, kind, rows):
    ops_, nbytes = [], 0
    for k, n in shapes:
        x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
        if kind == 0:
            w = jnp.asarray(rng.standard_normal((k, n)) * k**-0.5, jnp.bfloat16)
            ops_ += [x, w]
            nbytes += k * n * 2
        else:
            w = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
            ops_ += [x, w, jnp.full((n,), 300.0, jnp.bfloat16)]
            if kind == 2:
                ops_.append(jnp.full((rows,), 0.5, jnp.float32))
            nbytes += k * n
    return ops_, nbytes


def xla_call(jnp, kind, flat, group):
    """XLA's best form of the same products: padded to two rows."""
    out = []
    for i in range(0, len(flat), group):
        x, w, *scales = flat[i : i + group]
        rows = x.shape[0]
        if rows == 1:
            x = jnp.concatenate([x, x], axis=0)
        y = x @ w.astype(jnp.bfloat16)
        if scales:
            y = y / scales[0]
        out.append(y[:rows])
    return out


def chained(jax, jnp, call, copies):
    """One program of `copies` launches; launch i reads weight set
    i % len(sets)."""

    @jax.jit
    def run(sets):
        acc = jnp.zeros((), jnp.float32)
        for i in range(copies):
            flat = sets[i % len(sets)]
            x0 = flat[0] + (acc * 1e-9).astype(flat[0].dtype)
            ys = call([x0] + list(flat[1:]))
            # Every output, every column: XLA would otherwise compute only
            # what is read (it narrowed r, k, v, g to one column of one).
            for y in ys:
                acc = acc + jnp.sum(y[0].astype(jnp.float32))
        return acc

    return run


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--chain", type=int, default=48)
    parser.add_argument(
        "--bandwidth", type=float, help="bytes/s; default: the card's"
    )
    parser.add_argument("--working-set", type=float, default=256e6)
    parser.add_argument("--label", default="", help="names the output file")
    parser.add_argument("--impls", default="kernel,XLA")
    parser.add_argument("--rows", default="1,8")
    parser.add_argument("--kinds", default="0,1,2")
    args = parser.parse_args()
    # Made before the run: a missing folder must not lose a measurement.
    os.makedirs(args.out, exist_ok=True)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from gpu_profile import copy_rate
    from gpu_profile import profile
    from step_ops_gpu import kernel_ms

    from keras_rwkv.ops.matvec import jax_binding

    arch = jax.devices()[0].compute_capability.replace(".", "")
    jax_binding.load(arch)
    rng = np.random.default_rng(0)
    rows_out = []
    kinds = ((0, "bf16"), (1, "int8 (W8A16)"), (2, "int8 (Keras W8A8)"))
    for name, shapes in CASES:
        for kind, kind_name in kinds:
            if str(kind) not in args.kinds.split(","):
                continue
            for rows in [int(r) for r in args.rows.split(",")]:
                if rows == 8 and kind != 0:
                    continue
                flat, nbytes = operands(jnp, rng, shapes, kind, rows)
                distinct = max(1, min(16, round(args.working_set / nbytes)))
                sets = [flat] + [
                    operands(jnp, rng, shapes, kind, rows)[0]
                    for _ in range(distinct - 1)
                ]
                group = jax_binding.GROUP[kind]
                impls = (
                    ("kernel", lambda f, k=kind: jax_binding.ffi_call(k, f)),
                    ("XLA", lambda f, k=kind, g=group: xla_call(jnp, k, f, g)),
                )
                for impl, call in impls:
                    if impl not in args.impls.split(","):
                        continue
                    run = chained(jax, jnp, call, args.chain)
                    jax.block_until_ready(run(sets))
                    summary = profile(
                        lambda run=run, sets=sets: jax.block_until_ready(
                            run(sets)
                        )
                    )
                    kern, span, count = kernel_ms(summary)
                    rows_out.append(
                        (name, kind_name, rows, impl, kern, span, count, nbytes)
                    )
    lines = [
        f"# card: {jax.devices()[0].device_kind}, jax {jax.__version__}, "
        f"{args.chain} chained launches over {args.working_set / 1e6:.0f} "
        f"MB of weights {args.label}",
        "| matrices | weights | rows | impl | kernels/launch | kernel µs "
        "| effective µs | weight bytes | effective TB/s | of the card |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    bandwidth = copy_rate(jax.devices()[0].device_kind, args.bandwidth)
    for name, kind_name, rows, impl, kern, span, count, nbytes in rows_out:
        per_kern = kern / args.chain * 1e3
        per_eff = span / args.chain * 1e3
        tbs = nbytes / (per_eff * 1e-6) / 1e12 if per_eff else 0.0
        lines.append(
            f"| {name} | {kind_name} | {rows} | {impl} | "
            f"{count / args.chain:.1f} | {per_kern:.1f} | {per_eff:.1f} | "
            f"{nbytes / 1e6:.1f} MB | {tbs:.2f} | "
            f"{tbs * 1e12 / bandwidth:.0%} |"
        )
    text = "\n".join(lines)
    print(text)
    name = f"matvec_{args.label}.md" if args.label else "matvec.md"
    with open(os.path.join(args.out, name), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
