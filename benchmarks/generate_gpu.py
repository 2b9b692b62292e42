"""Decode and prefill speed of a random RWKV6 1.6B (bf16) on one GPU: ours
(JAX, one compiled program per shape) next to BlinkDL's `rwkv` package
("cuda bf16", RWKV_CUDA_ON=1) in the same call.

Each implementation runs in its own process (so neither sees the other's
memory pools); `--summary` prints the table and ratios.

    python3 benchmarks/generate_gpu.py --impl blinkdl --out $OUT
    KERAS_BACKEND=jax python3 benchmarks/generate_gpu.py --impl ours --out $OUT
    python3 benchmarks/generate_gpu.py --summary --out $OUT

Figures: batch-1 decode tokens/s (greedy, 16-token prompt, 256 new tokens,
end to end), batch 8 and 64 aggregate tokens/s, and prefill tokens/s of a
1024-token prompt (batch 1). Medians of `--repeats` runs after a warm-up.
"""

import argparse
import json
import os

from shapes import RWKV6_1B6
from timing import median_seconds

# RWKV6 World 1B6 shapes (DESIGN.md).
DIMS = dict(RWKV6_1B6)
PROMPT, NEW, PREFILL = 16, 256, 1024
BATCHES = (1, 8, 64)


def bench_ours(repeats):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import jax
    import keras
    import numpy as np

    from keras_rwkv import RWKV6Backbone
    from keras_rwkv import RWKV6CausalLM

    keras.utils.set_random_seed(0)
    backbone = RWKV6Backbone(**DIMS, dtype="bfloat16")
    lm = RWKV6CausalLM(backbone)
    lm.compile(sampler="greedy")
    rng = np.random.default_rng(0)
    result = {"device": str(jax.devices()[0].device_kind)}

    for batch in BATCHES:
        ids = rng.integers(1, 65529, (batch, PROMPT)).astype("int32")
        inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}

        def run(inputs=inputs, batch=batch):
            out = lm.generate(inputs, max_new_tokens=NEW, stop_token_ids=None)
            assert out["padding_mask"].sum() == batch * (PROMPT + NEW)

        t = median_seconds(run, repeats)
        result[f"decode_b{batch}"] = batch * NEW / t

    ids = rng.integers(1, 65529, (1, PREFILL)).astype("int32")
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}

    def prefill():
        jax.block_until_ready(lm.prefill(inputs).wkv)

    result["prefill_1024"] = PREFILL / median_seconds(prefill, repeats)
    return result


def bench_blinkdl(repeats, workdir):
    os.environ["RWKV_JIT_ON"] = "1"
    os.environ.setdefault("RWKV_CUDA_ON", "1")
    import torch

    path = os.path.join(workdir, "rwkv6_1b6_random.pth")
    if not os.path.exists(path):
        torch.manual_seed(0)
        torch.set_default_device("cuda")  # fast random init
        c, f, v, n = 2048, 7168, 65536, 64
        h = c // n
        sd = {
            "emb.weight": torch.randn(v, c),
            "blocks.0.ln0.weight": torch.ones(c),
            "blocks.0.ln0.bias": torch.zeros(c),
            "ln_out.weight": torch.ones(c),
            "ln_out.bias": torch.zeros(c),
            "head.weight": torch.randn(v, c) * c**-0.5,
        }
        for i in range(24):
            p = f"blocks.{i}."
            for name in ("ln1", "ln2", "att.ln_x"):
                sd[p + name + ".weight"] = torch.ones(c)
                sd[p + name + ".bias"] = torch.zeros(c)
            for m in "xwkvrg":
                sd[p + f"att.time_maa_{m}"] = torch.rand(1, 1, c)
            sd[p + "att.time_maa_w1"] = torch.randn(c, 5 * 32) * 0.01
            sd[p + "att.time_maa_w2"] = torch.randn(5, 32, c) * 0.01
            sd[p + "att.time_decay"] = torch.rand(1, 1, c) * 5 - 6
            sd[p + "att.time_decay_w1"] = torch.randn(c, 64) * 0.01
            sd[p + "att.time_decay_w2"] = torch.randn(64, c) * 0.01
            sd[p + "att.time_faaaa"] = torch.randn(h, n) * 0.1
            for m in ("receptance", "key", "value", "gate", "output"):
                sd[p + f"att.{m}.weight"] = torch.randn(c, c) * c**-0.5
            sd[p + "ffn.time_maa_k"] = torch.rand(1, 1, c)
            sd[p + "ffn.time_maa_r"] = torch.rand(1, 1, c)
            sd[p + "ffn.key.weight"] = torch.randn(f, c) * c**-0.5
            sd[p + "ffn.receptance.weight"] = torch.randn(c, c) * c**-0.5
            sd[p + "ffn.value.weight"] = torch.randn(c, f) * f**-0.5
        torch.save({k: t.bfloat16().cpu() for k, t in sd.items()}, path)
        del sd
        torch.set_default_device("cpu")
        torch.cuda.empty_cache()

    from rwkv.model import RWKV

    model = RWKV(model=path[: -len(".pth")], strategy="cuda bf16")
    result = {
        "device": torch.cuda.get_device_name(),
        "rwkv_cuda_on": os.environ["RWKV_CUDA_ON"],
    }
    gen = torch.Generator().manual_seed(0)

    for batch in (1,):  # BlinkDL's forward() takes one sequence

        def run():
            tokens = torch.randint(1, 65529, (PROMPT,), generator=gen)
            out, state = model.forward(tokens.tolist(), None)
            for _ in range(NEW):
                token = int(torch.argmax(out))
                out, state = model.forward([token], state)
            torch.cuda.synchronize()

        result[f"decode_b{batch}"] = batch * NEW / median_seconds(run, repeats)

    tokens = torch.randint(1, 65529, (PREFILL,), generator=gen).tolist()

    def prefill():
        model.forward(tokens, None)
        torch.cuda.synchronize()

    result["prefill_1024"] = PREFILL / median_seconds(prefill, repeats)
    return result


def summary(out_dir):
    rows = {}
    for impl in ("ours", "blinkdl"):
        path = os.path.join(out_dir, f"generate_{impl}.json")
        if os.path.exists(path):
            with open(path) as f:
                rows[impl] = json.load(f)
    ours, ref = rows.get("ours", {}), rows.get("blinkdl", {})
    print(f"# card: {ours.get('device') or ref.get('device')}")
    print(f"# BlinkDL RWKV_CUDA_ON={ref.get('rwkv_cuda_on')}")
    print("| figure | BlinkDL rwkv (anchor) | keras_rwkv (JAX) | ratio |")
    print("|---|---|---|---|")
    for key in [f"decode_b{b}" for b in BATCHES] + ["prefill_1024"]:
        a, b = ref.get(key), ours.get(key)
        ratio = f"{b / a:.2f}x" if a and b else "-"
        fa = f"{a:,.0f} tok/s" if a else "-"
        fb = f"{b:,.0f} tok/s" if b else "-"
        print(f"| {key} | {fa} | {fb} | {ratio} |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", choices=["ours", "blinkdl"])
    parser.add_argument("--summary", action="store_true")
    parser.add_argument("--out", default=".")
    parser.add_argument("--workdir", default="/tmp")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    # Made before the run: a missing folder must not lose a measurement.
    os.makedirs(args.out, exist_ok=True)
    if args.summary:
        summary(args.out)
        return
    if args.tiny:  # a CPU smoke test of the script itself
        global NEW, PREFILL, BATCHES
        DIMS.update(num_layers=2, hidden_dim=128, intermediate_dim=256)
        NEW, PREFILL, BATCHES = 8, 64, (1, 2)
    if args.impl == "ours":
        result = bench_ours(args.repeats)
    else:
        result = bench_blinkdl(args.repeats, args.workdir)
    print(json.dumps(result))
    with open(os.path.join(args.out, f"generate_{args.impl}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
