"""Peak GPU memory and step time of state tuning a random RWKV6 1.6B.

bf16 weights (frozen), float32 tuned states (WKV + token shift), Adam,
context 1024, batch 1, JAX, Python WKV path. The reference figure is
RWKV-PEFT's report of 6.4 GB on an RTX 4090 for the same setting (not
measured here: RWKV-PEFT is a torch/DeepSpeed training stack).

    KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false \\
        python3 benchmarks/state_tuning_gpu.py
"""

import argparse
import os
import time

from shapes import RWKV6_1B6

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

DIMS = dict(RWKV6_1B6)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test")
    args = parser.parse_args()

    import jax
    import keras
    import numpy as np

    from keras_rwkv import RWKV6Backbone
    from keras_rwkv import RWKV6CausalLM

    if args.tiny:
        DIMS.update(num_layers=2, hidden_dim=128, intermediate_dim=256)
    device = jax.devices()[0]
    keras.utils.set_random_seed(0)
    lm = RWKV6CausalLM(RWKV6Backbone(**DIMS, dtype="bfloat16"))
    lm.enable_state_tuning(time_shift=True)
    lm.compile(optimizer=keras.optimizers.Adam(1.0))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 65529, (args.batch, args.context + 1))
    x = {
        "token_ids": ids[:, :-1].astype("int32"),
        "padding_mask": np.ones((args.batch, args.context), "int32"),
    }
    y = ids[:, 1:].astype("int32")

    lm.train_on_batch(x, y)  # compile
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = lm.train_on_batch(x, y)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
    step = float(np.median(times))
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use", 0) / 2**30
    weights = sum(v.value.nbytes for v in lm.weights)
    print(
        f"# {device.device_kind}, JAX {jax.__version__}, 1.6B bf16, "
        f"context {args.context}, batch {args.batch}, state tuning "
        f"(WKV + shift), Adam, median of {args.steps} steps"
    )
    print("| figure | value |")
    print("|---|---|")
    print(f"| step time | {step * 1e3:.0f} ms |")
    print(f"| tokens/s | {args.batch * args.context / step:,.0f} |")
    print(f"| peak GPU memory | {peak:.2f} GiB |")
    print(f"| of which weights | {weights / 2**30:.2f} GiB |")
    print(
        f"| trainable parameters | "
        f"{sum(int(np.prod(v.shape)) for v in lm.trainable_variables):,} |"
    )


if __name__ == "__main__":
    main()
