"""Python vs CUDA WKV path at model level, same call, same card (JAX):

1. state tuning of a small random model: the loss curves of both paths;
2. a random RWKV6 1.6B (bf16) training step at T=4096, batch 1 (SGD, so
   optimizer state does not dominate memory): tokens/s of both paths.

    KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false \\
        python3 benchmarks/train_step_gpu.py
"""

import argparse
import os
import time

from shapes import RWKV6_1B6

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

SMALL = dict(
    vocabulary_size=512,
    num_layers=2,
    hidden_dim=256,
    intermediate_dim=512,
    head_size=64,
    mix_lora_dim=16,
    decay_lora_dim=32,
)


def loss_curve(kernel, steps):
    import keras
    import numpy as np

    from keras_rwkv import RWKV6Backbone
    from keras_rwkv import RWKV6CausalLM

    keras.utils.set_random_seed(0)
    lm = RWKV6CausalLM(RWKV6Backbone(**SMALL, wkv_kernel=kernel))
    lm.enable_state_tuning(time_shift=True)
    lm.compile(optimizer=keras.optimizers.Adam(0.1))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 512, (4, 129)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((4, 128), "int32")}
    return [
        float(lm.train_on_batch(x, ids[:, 1:], return_dict=True)["loss"])
        for _ in range(steps)
    ]


def train_tokens_per_s(kernel, context, steps):
    import jax
    import keras
    import numpy as np

    from keras_rwkv import RWKV6Backbone
    from keras_rwkv import RWKV6CausalLM

    keras.utils.set_random_seed(0)
    lm = RWKV6CausalLM(
        RWKV6Backbone(**RWKV6_1B6, dtype="bfloat16", wkv_kernel=kernel)
    )
    lm.compile(optimizer=keras.optimizers.SGD(1e-4))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 65529, (1, context + 1)).astype("int32")
    x = {
        "token_ids": ids[:, :-1],
        "padding_mask": np.ones((1, context), "int32"),
    }
    lm.train_on_batch(x, ids[:, 1:])  # compile
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(lm.train_on_batch(x, ids[:, 1:]))
        times.append(time.perf_counter() - t0)
    del lm
    keras.backend.clear_session()
    return context / float(np.median(times))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--curve-steps", type=int, default=20)
    parser.add_argument("--skip-1b6", action="store_true")
    args = parser.parse_args()
    import jax

    curves = {k: loss_curve(k, args.curve_steps) for k in ("python", "cuda")}
    diff = max(
        abs(a - b) / abs(a) for a, b in zip(curves["python"], curves["cuda"])
    )
    print(f"# {jax.devices()[0].device_kind}, JAX {jax.__version__}")
    print("| step | loss (python) | loss (cuda) |")
    print("|---|---|---|")
    for i in range(0, args.curve_steps, max(1, args.curve_steps // 5)):
        print(f"| {i} | {curves['python'][i]:.5f} | {curves['cuda'][i]:.5f} |")
    print(f"max relative difference over {args.curve_steps} steps: {diff:.2e}")
    if args.skip_1b6:
        return
    rows = {}
    for kernel in ("python", "cuda"):
        try:
            rows[kernel] = train_tokens_per_s(kernel, args.context, args.steps)
        except Exception as e:  # e.g. out of memory on the Python path
            rows[kernel] = None
            print(f"{kernel}: {type(e).__name__}: {str(e)[:200]}")
    print(f"| 1.6B bf16 train step, T={args.context}, batch 1 | tokens/s |")
    print("|---|---|")
    for kernel, value in rows.items():
        print(
            f"| {kernel} WKV | {value:,.0f} |" if value else f"| {kernel} | - |"
        )
    if rows.get("python") and rows.get("cuda"):
        print(f"cuda / python: {rows['cuda'] / rows['python']:.2f}x")


if __name__ == "__main__":
    main()
