"""Python vs CUDA WKV path at model level, same call, same card (JAX):

1. state tuning of a small random model: the loss curves of both paths;
2. a random RWKV6 1.6B (bf16): prefill of a 1024-token prompt and a
   training step at T=4096, batch 1 (SGD, so optimizer state does not
   dominate memory), tokens/s of the Python path and of the CUDA path in
   each kernel form of `--forms` (KERAS_RWKV_WKV6_FORM; "auto" is the
   default choice).

    KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false \\
        python3 benchmarks/train_step_gpu.py [--forms auto,step,parallel]
"""

import argparse
import os

from shapes import RWKV6_1B6
from timing import median_seconds

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

DIMS = dict(RWKV6_1B6)  # the model of section 2 (--tiny shrinks it)
PREFILL = 1024  # prompt tokens
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


def model_rates(kernel, context, steps, form=None):
    """`(prefill tokens/s, train tokens/s)` of the 1.6B with `kernel`
    ("python" or "cuda") in kernel `form` (None: the default)."""
    import jax
    import keras
    import numpy as np

    from keras_rwkv import RWKV6Backbone
    from keras_rwkv import RWKV6CausalLM

    # Read when the programs are traced: each form builds its own.
    os.environ.pop("KERAS_RWKV_WKV6_FORM", None)
    if form:
        os.environ["KERAS_RWKV_WKV6_FORM"] = form
    keras.utils.set_random_seed(0)
    lm = RWKV6CausalLM(
        RWKV6Backbone(**DIMS, dtype="bfloat16", wkv_kernel=kernel)
    )
    lm.compile(optimizer=keras.optimizers.SGD(1e-4))
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 65529, (1, PREFILL)).astype("int32")
    prompt = {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}
    prefill = PREFILL / median_seconds(
        lambda: jax.block_until_ready(lm.prefill(prompt).wkv), steps
    )
    ids = rng.integers(1, 65529, (1, context + 1)).astype("int32")
    x = {
        "token_ids": ids[:, :-1],
        "padding_mask": np.ones((1, context), "int32"),
    }
    train = context / median_seconds(
        lambda: jax.block_until_ready(lm.train_on_batch(x, ids[:, 1:])),
        steps,
    )
    keras.backend.clear_session()
    os.environ.pop("KERAS_RWKV_WKV6_FORM", None)
    return prefill, train


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--curve-steps", type=int, default=20)
    parser.add_argument("--skip-1b6", action="store_true")
    parser.add_argument(
        "--tiny", action="store_true", help="a CPU smoke test of the script"
    )
    parser.add_argument(
        "--forms",
        default="auto",
        help="comma-separated CUDA kernel forms: auto, step, parallel",
    )
    args = parser.parse_args()
    if args.tiny:
        global PREFILL
        DIMS.update(num_layers=2, hidden_dim=128, intermediate_dim=256)
        PREFILL, args.context = 32, 64
    import jax

    print(f"# {jax.devices()[0].device_kind}, JAX {jax.__version__}")
    if args.curve_steps:
        curves = {
            k: loss_curve(k, args.curve_steps) for k in ("python", "cuda")
        }
        diff = max(
            abs(a - b) / abs(a)
            for a, b in zip(curves["python"], curves["cuda"])
        )
        print("| step | loss (python) | loss (cuda) |")
        print("|---|---|---|")
        for i in range(0, args.curve_steps, max(1, args.curve_steps // 5)):
            print(
                f"| {i} | {curves['python'][i]:.5f} | {curves['cuda'][i]:.5f} |"
            )
        print(
            f"max relative difference over {args.curve_steps} steps: {diff:.2e}"
        )
    if args.skip_1b6:
        return
    runs = [("python", None)] + [
        ("cuda", form) for form in args.forms.split(",")
    ]
    rows = {}
    for kernel, form in runs:
        name = kernel if form is None else f"{kernel}, {form}"
        try:
            rows[name] = model_rates(kernel, args.context, args.steps, form)
        except Exception as e:  # e.g. out of memory on the Python path
            print(f"{name} failed: {type(e).__name__}: {str(e)[:200]}")
    print(
        f"| 1.6B bf16, batch 1 | prefill T={PREFILL}, tok/s "
        f"| train step T={args.context}, tok/s | train vs python |"
    )
    print("|---|---|---|---|")
    base = rows.get("python", (None, None))[1]
    for name, (prefill, train) in rows.items():
        ratio = f"{train / base:.2f}x" if base else "-"
        print(f"| {name} WKV | {prefill:,.0f} | {train:,.0f} | {ratio} |")


if __name__ == "__main__":
    main()
