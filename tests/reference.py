"""Independent references for the tests.

- BlinkDL's official `rwkv` package (CPU fp32) driven from a random .pth.
- A float64 step-by-step WKV recurrence in torch (autograd for gradients).
"""

import numpy as np
import torch

SMALL = dict(vocab=300, layers=2, hidden=192, ffn=672, d_mix=32, d_dec=64)
LORA7B = dict(vocab=250, layers=2, hidden=128, ffn=448, d_mix=64, d_dec=128)


def random_rwkv6_state_dict(
    vocab,
    layers,
    hidden,
    ffn,
    d_mix=32,
    d_dec=64,
    head=64,
    seed=0,
    dtype=torch.float32,
):
    """A BlinkDL-format RWKV6 state dict with random weights of
    realistic scale."""
    g = torch.Generator().manual_seed(seed)
    c, h = hidden, hidden // head

    def normal(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    def uniform(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    sd = {
        "emb.weight": normal(vocab, c),
        "blocks.0.ln0.weight": uniform(c, lo=0.5, hi=1.5),
        "blocks.0.ln0.bias": normal(c, std=0.1),
        "ln_out.weight": uniform(c, lo=0.5, hi=1.5),
        "ln_out.bias": normal(c, std=0.1),
        "head.weight": normal(vocab, c, std=c**-0.5),
    }
    for i in range(layers):
        p = f"blocks.{i}."
        for name in ("ln1", "ln2", "att.ln_x"):
            sd[p + name + ".weight"] = uniform(c, lo=0.5, hi=1.5)
            sd[p + name + ".bias"] = normal(c, std=0.1)
        for m in "xwkvrg":
            sd[p + f"att.time_maa_{m}"] = uniform(1, 1, c)
        sd[p + "att.time_maa_w1"] = normal(c, 5 * d_mix, std=0.1)
        sd[p + "att.time_maa_w2"] = normal(5, d_mix, c, std=0.1)
        sd[p + "att.time_decay"] = uniform(1, 1, c, lo=-6.0, hi=1.0)
        sd[p + "att.time_decay_w1"] = normal(c, d_dec, std=0.1)
        sd[p + "att.time_decay_w2"] = normal(d_dec, c, std=0.1)
        sd[p + "att.time_faaaa"] = normal(h, head, std=0.5)
        for m in ("receptance", "key", "value", "gate", "output"):
            sd[p + f"att.{m}.weight"] = normal(c, c, std=c**-0.5)
        sd[p + "ffn.time_maa_k"] = uniform(1, 1, c)
        sd[p + "ffn.time_maa_r"] = uniform(1, 1, c)
        sd[p + "ffn.key.weight"] = normal(ffn, c, std=c**-0.5)
        sd[p + "ffn.receptance.weight"] = normal(c, c, std=c**-0.5)
        sd[p + "ffn.value.weight"] = normal(c, ffn, std=ffn**-0.5)
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def save_checkpoint(path, state_dict):
    torch.save(state_dict, str(path))
    return str(path)


def blinkdl_model(pth_path):
    """BlinkDL's RWKV on CPU fp32 (the official implementation)."""
    from rwkv.model import RWKV

    return RWKV(model=str(pth_path)[: -len(".pth")], strategy="cpu fp32")


def blinkdl_forward(model, tokens, state=None):
    """Logits for every token `[T, V]` and the state, as numpy (state as
    (att_shift [L, C], wkv [L, H, N, N], ffn_shift [L, C]))."""
    out, state = model.forward(list(tokens), state, full_output=True)
    n = len(state) // 3
    att = np.stack([state[3 * i].numpy() for i in range(n)])
    wkv = np.stack([state[3 * i + 1].numpy() for i in range(n)])
    ffn = np.stack([state[3 * i + 2].numpy() for i in range(n)])
    return out.numpy(), (att, wkv, ffn), state


def wkv_reference_torch(r, k, v, log_w, u, state):
    """Plain step-by-step WKV6 recurrence (any dtype; use float64)."""
    _, t_len, _, _ = r.shape
    ys = []
    s = state
    for t in range(t_len):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        ys.append(torch.einsum("bhi,bhij->bhj", r[:, t], s + u[..., None] * kv))
        s = torch.exp(log_w[:, t])[..., None] * s + kv
    return torch.stack(ys, 1), s


def relative_error(actual, expected):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30)


# A World-vocabulary model small enough for CLI and process tests.
TINY_WORLD = dict(
    vocabulary_size=65536,
    num_layers=2,
    hidden_dim=64,
    intermediate_dim=128,
    head_size=32,
    mix_lora_dim=4,
    decay_lora_dim=8,
)


def save_tiny_world_preset(path, spread=0.5, seed=0):
    """A random `TINY_WORLD` backbone and the World tokenizer saved as a
    KerasHub preset at `path`. `spread`: the std of normal weights (so that
    sampling is not degenerate), or None for the layers' initialisers."""
    import keras

    from keras_rwkv import RWKV6Backbone
    from keras_rwkv import RWKV6Tokenizer

    keras.utils.set_random_seed(seed)
    backbone = RWKV6Backbone(**TINY_WORLD)
    if spread is not None:
        rng = np.random.default_rng(seed)
        backbone.set_weights(
            [
                rng.normal(0, spread, w.shape).astype("float32")
                for w in backbone.get_weights()
            ]
        )
    backbone.save_to_preset(str(path))
    RWKV6Tokenizer().save_to_preset(str(path))
    return backbone
