"""Where a decode step's time goes: a random RWKV6 1.6B on one GPU (JAX).

For one variant (XLA flags, quantization) it reports:
- decode tokens/s of `generate` (16-token prompt, `--new` tokens, greedy)
  at each batch size, and the per-token decode time with the prompt's
  read taken out;
- a profile of the decoding loop (kernels per token, their time, the GPU
  busy time against the span: the gaps are launch overhead);
- the bytes a token reads (weights, the state) and the time they take at
  `--bandwidth` (the card's copy rate), i.e. the ceiling.

Each variant runs in its own process, since XLA reads its flags once:

    python3 benchmarks/decode_profile_gpu.py --variant base --out $OUT
    python3 benchmarks/decode_profile_gpu.py --variant int8 --out $OUT
    python3 benchmarks/decode_profile_gpu.py --summary --out $OUT
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_profile import copy_rate  # noqa: E402
from shapes import RWKV6_1B6  # noqa: E402

# name: (extra XLA flags, quantization mode or None, environment); the
# pseudo-variable FUSION=off keeps the fused step kernels out (products on
# the matvec kernel only: the code before them).
VARIANTS = {
    "base": ("", None, {}),
    "matvec": ("", None, {"FUSION": "off"}),
    "xla": ("", None, {"KERAS_RWKV_STEP_KERNEL": "xla"}),
    "int8_xla": ("", "int8", {"KERAS_RWKV_STEP_KERNEL": "xla"}),
    "rows1": ("", None, {"KERAS_RWKV_STEP_ROWS": "1"}),
    "rows8": ("", None, {"KERAS_RWKV_STEP_ROWS": "8"}),
    "cmdbuf": (
        "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,"
        "CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1",
        None,
        {},
    ),
    "int8": ("", "int8", {}),
    "int8_weights": ("", "int8_weights", {}),
    "int8_weights_xla": (
        "",
        "int8_weights",
        {"KERAS_RWKV_STEP_KERNEL": "xla"},
    ),
    "int4": ("", "int4", {}),
}
PROMPT = 16


def weight_bytes(lm):
    """Bytes a decode step reads: every weight except the embedding
    table (one row of it)."""
    total = 0
    for v in lm.backbone.weights:
        n = int(v.value.nbytes)  # no copy to the host
        if "token_embedding/embeddings" in v.path:
            n = n // v.shape[0]
        total += n
    return total


def quantize(lm, mode):
    if mode == "int8_weights":
        from keras.quantizers import AbsMaxQuantizer
        from keras.quantizers import Int8QuantizationConfig

        config = Int8QuantizationConfig(
            weight_quantizer=AbsMaxQuantizer(axis=0),
            activation_quantizer=None,
        )
        lm.quantize(config=config)
    else:
        lm.quantize(mode)


def run_variant(name, new_tokens, batches, profile_new, profile_batches):
    flags, mode, env = VARIANTS[name]
    env = dict(env)
    fusion = env.pop("FUSION", "on")
    os.environ.update(env)
    if flags:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " " + flags
        ).strip()
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import jax
    import keras
    import numpy as np
    from gpu_profile import profile
    from timing import median_seconds

    from keras_rwkv import RWKV6Backbone
    from keras_rwkv import RWKV6CausalLM
    from keras_rwkv.models.rwkv6 import rwkv6_step_fusion

    if fusion == "off":
        rwkv6_step_fusion.step_fused = lambda: None
    keras.utils.set_random_seed(0)
    backbone = RWKV6Backbone(**RWKV6_1B6, dtype="bfloat16")
    lm = RWKV6CausalLM(backbone)
    if mode:
        quantize(lm, mode)
    lm.compile(sampler="greedy")
    rng = np.random.default_rng(0)
    result = {
        "variant": name,
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "step_bytes": weight_bytes(lm),
    }

    def inputs_for(batch, length):
        ids = rng.integers(1, 65529, (batch, length)).astype("int32")
        return {"token_ids": ids, "padding_mask": np.ones_like(ids)}

    for batch in batches:
        inputs = inputs_for(batch, PROMPT)

        def gen(inputs=inputs, new=new_tokens):
            out = lm.generate(inputs, max_new_tokens=new, stop_token_ids=None)
            assert out["padding_mask"].sum() == len(out["padding_mask"]) * (
                PROMPT + new
            )

        def read(inputs=inputs):
            jax.block_until_ready(lm.prefill(inputs).wkv)

        t_gen = median_seconds(gen, 3)
        t_read = median_seconds(read, 3)
        result[f"b{batch}_tok_s"] = batch * new_tokens / t_gen
        result[f"b{batch}_step_ms"] = (t_gen - t_read) / new_tokens * 1e3

    # The decoding loop, profiled: `profile_new` tokens.
    for batch in profile_batches:
        inputs = inputs_for(batch, PROMPT)

        def gen_short(inputs=inputs):
            lm.generate(inputs, max_new_tokens=profile_new, stop_token_ids=None)

        gen_short()
        key = "loop_profile" if batch == 1 else f"loop_profile_b{batch}"
        result[key] = profile(gen_short, top=30)
    result["loop_tokens"] = profile_new

    return result


def summary(out_dir, bandwidth):
    rows = []
    for name in VARIANTS:
        path = os.path.join(out_dir, f"decode_profile_{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                rows.append(json.load(f))
    if not rows:
        print("no results")
        return
    print(f"# card: {rows[0]['device']}, jax {rows[0]['jax']}")
    bandwidth = copy_rate(rows[0]["device"], bandwidth)
    batches = sorted(
        {
            int(k[1:].split("_")[0])
            for r in rows
            for k in r
            if k.startswith("b") and k.endswith("_tok_s")
        }
    )
    head = " | ".join(f"b{b} tok/s (ms/step)" for b in batches)
    print(
        f"| variant | {head} | bytes/token | ceiling b1 | kernels/token"
        " | GPU busy ms/token | busy/span |"
    )
    print("|---" * (len(batches) + 6) + "|")
    for r in rows:
        cells = [
            f"{r[f'b{b}_tok_s']:,.0f} ({r[f'b{b}_step_ms']:.2f})"
            if f"b{b}_tok_s" in r
            else "-"
            for b in batches
        ]
        ceiling = bandwidth / r["step_bytes"]
        loop = next(iter(r["loop_profile"].values()), {})
        # The profiled generate reads the prompt first: one step more.
        steps = r["loop_tokens"] + 1
        kernels = loop.get("kernels", 0) / steps
        busy = loop.get("busy_ms", 0) / steps
        ratio = loop.get("busy_ms", 0) / max(loop.get("span_ms", 0), 1e-9)
        print(
            f"| {r['variant']} | {' | '.join(cells)} | "
            f"{r['step_bytes'] / 1e9:.2f} GB | {ceiling:,.0f} tok/s | "
            f"{kernels:.0f} | {busy:.2f} | {ratio:.2f} |"
        )
    for r in rows:
        for key in sorted(k for k in r if k.startswith("loop_profile")):
            print(f"\n## {r['variant']} {key}: top kernels")
            print_profile(r[key])


def print_profile(loop_profile):
    for gpu in loop_profile.values():
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in gpu["kinds_ms"].items())
        print(
            f"span {gpu['span_ms']:.1f} ms, busy {gpu['busy_ms']:.1f} ms;"
            f" {kinds}"
        )
        for name, ms, count in gpu["top"]:
            print(f"  {ms:8.2f} ms {count:6d}x  {name}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", choices=sorted(VARIANTS))
    parser.add_argument("--summary", action="store_true")
    parser.add_argument("--out", default=".")
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--profile-new", type=int, default=32)
    parser.add_argument("--profile-batches", default="1")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument(
        "--bandwidth", type=float, help="bytes/s; default: the card's"
    )
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    # Made before the run: a missing folder must not lose a measurement.
    os.makedirs(args.out, exist_ok=True)
    if args.summary:
        summary(args.out, args.bandwidth)
        return
    if args.tiny:  # a CPU smoke test of the script itself
        RWKV6_1B6.update(num_layers=2, hidden_dim=128, intermediate_dim=256)
    batches = [int(b) for b in args.batches.split(",")]
    profile_batches = [int(b) for b in args.profile_batches.split(",")]
    result = run_variant(
        args.variant, args.new, batches, args.profile_new, profile_batches
    )
    path = os.path.join(args.out, f"decode_profile_{args.variant}.json")
    with open(path, "w") as f:
        json.dump(result, f)
    print(json.dumps({k: v for k, v in result.items() if "profile" not in k}))


if __name__ == "__main__":
    main()
