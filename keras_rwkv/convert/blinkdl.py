"""BlinkDL RWKV6 checkpoints (`RWKV-x060-*.pth`) -> `RWKV6Backbone`.

Every dimension is inferred from the tensors; the file is checked key by
key and shape by shape before a single weight is copied, so a wrong file
fails fast with a message that says what is wrong.
"""

import re

import numpy as np

from keras_rwkv.convert.torch_checkpoint import CheckpointError

# Keys a BlinkDL RWKV6 checkpoint may carry beyond the model proper
# (`time_state` is a tuned initial state, RWKV-PEFT format, merged in).
OPTIONAL_LAYER_KEYS = ("att.time_state",)


def detect_rwkv_version(keys):
    """Guesses the RWKV generation of a BlinkDL checkpoint from its keys.

    Returns:
        `"4"`, `"5"`, `"6"`, `"7"`, or `None` if the keys do not look like
        an RWKV checkpoint at all.
    """
    keys = set(keys)

    def has(suffix):
        return any(k.endswith(suffix) for k in keys)

    if not any(k.startswith("blocks.") for k in keys):
        return None
    if has("att.r_k") or has("att.w0") or has("att.a0"):
        return "7"
    if has("att.time_maa_w1") or has("att.time_maa_x"):
        return "6"
    if has("att.ln_x.weight"):
        return "5"
    if has("att.time_first") or has("att.time_mix_k"):
        return "4"
    return None


def config_from_weights(weights):
    """Infers the `RWKV6Backbone` arguments from a BlinkDL state dict."""
    version = detect_rwkv_version(weights.keys())
    if version != "6":
        what = (
            f"an RWKV-{version} checkpoint"
            if version
            else "not an RWKV checkpoint (no `blocks.*` weights)"
        )
        raise CheckpointError(
            f"This looks like {what}; keras_rwkv converts RWKV-6 (x060, "
            "'Finch') checkpoints only, such as "
            "RWKV-x060-World-1B6-v2.1-20240328-ctx4096.pth."
        )
    for key in (
        "emb.weight",
        "blocks.0.att.time_faaaa",
        "blocks.0.att.time_maa_w1",
        "blocks.0.att.time_decay_w1",
        "blocks.0.ffn.key.weight",
    ):
        if key not in weights:
            raise CheckpointError(
                f"RWKV-6 checkpoint is missing `{key}`; the file is "
                "incomplete or not a BlinkDL-format checkpoint."
            )
    layer_ids = {
        int(m.group(1))
        for k in weights
        if (m := re.match(r"blocks\.(\d+)\.", k))
    }
    vocab, hidden = weights["emb.weight"].shape
    num_heads, head_size = weights["blocks.0.att.time_faaaa"].shape
    return {
        "vocabulary_size": int(vocab),
        "num_layers": max(layer_ids) + 1,
        "hidden_dim": int(hidden),
        "intermediate_dim": int(weights["blocks.0.ffn.key.weight"].shape[0]),
        "head_size": int(head_size),
        "mix_lora_dim": int(weights["blocks.0.att.time_maa_w1"].shape[1] // 5),
        "decay_lora_dim": int(weights["blocks.0.att.time_decay_w1"].shape[1]),
    }


def expected_shapes(config):
    """Every key of a BlinkDL RWKV6 checkpoint with its shape."""
    v, c = config["vocabulary_size"], config["hidden_dim"]
    f, n = config["intermediate_dim"], config["head_size"]
    h = c // n
    dm, dd = config["mix_lora_dim"], config["decay_lora_dim"]
    shapes = {
        "emb.weight": (v, c),
        "blocks.0.ln0.weight": (c,),
        "blocks.0.ln0.bias": (c,),
        "ln_out.weight": (c,),
        "ln_out.bias": (c,),
        "head.weight": (v, c),
    }
    for i in range(config["num_layers"]):
        p = f"blocks.{i}."
        for name in ("ln1", "ln2", "att.ln_x"):
            shapes[f"{p}{name}.weight"] = (c,)
            shapes[f"{p}{name}.bias"] = (c,)
        for m in ("x", "w", "k", "v", "r", "g"):
            shapes[f"{p}att.time_maa_{m}"] = (1, 1, c)
        shapes[f"{p}att.time_maa_w1"] = (c, 5 * dm)
        shapes[f"{p}att.time_maa_w2"] = (5, dm, c)
        shapes[f"{p}att.time_decay"] = (1, 1, c)
        shapes[f"{p}att.time_decay_w1"] = (c, dd)
        shapes[f"{p}att.time_decay_w2"] = (dd, c)
        shapes[f"{p}att.time_faaaa"] = (h, n)
        for m in ("receptance", "key", "value", "gate", "output"):
            shapes[f"{p}att.{m}.weight"] = (c, c)
        shapes[f"{p}ffn.time_maa_k"] = (1, 1, c)
        shapes[f"{p}ffn.time_maa_r"] = (1, 1, c)
        shapes[f"{p}ffn.key.weight"] = (f, c)
        shapes[f"{p}ffn.receptance.weight"] = (c, c)
        shapes[f"{p}ffn.value.weight"] = (c, f)
    return shapes


def check_weights(weights, config):
    """Raises `CheckpointError` naming every missing key, every shape
    mismatch and every unknown key."""
    shapes = expected_shapes(config)
    missing = [k for k in shapes if k not in weights]
    wrong = [
        f"{k}: {tuple(weights[k].shape)} (expected {shapes[k]})"
        for k in shapes
        if k in weights and _squeezed(weights[k].shape) != _squeezed(shapes[k])
    ]
    unknown = [
        k
        for k in weights
        if k not in shapes
        and not any(k.endswith(s) for s in OPTIONAL_LAYER_KEYS)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if wrong:
        problems.append(f"unexpected shapes: {_listing(wrong)}")
    if unknown:
        problems.append(f"unknown keys: {_listing(unknown)}")
    if problems:
        raise CheckpointError(
            "Not a consistent RWKV-6 checkpoint (dims inferred: "
            f"{config}); " + "; ".join(problems) + ". The file may be "
            "damaged, or made for another architecture."
        )


def _squeezed(shape):
    # BlinkDL stores per-channel vectors as [1, 1, C]; accept [C] as well.
    return tuple(d for d in shape if d != 1)


def _listing(items, limit=8):
    shown = ", ".join(items[:limit])
    more = len(items) - limit
    return shown + (f" and {more} more" if more > 0 else "")


def _vector(x):
    return np.reshape(x, (-1,))


def _transpose(x):
    return np.transpose(x)


def assign_weights(backbone, weights, progress=None):
    """Copies BlinkDL weights into a built `RWKV6Backbone` of matching
    config. `progress`, if given, is called once per layer."""

    def put(variable, value):
        value = np.asarray(value)
        if tuple(variable.shape) != value.shape:
            raise CheckpointError(
                f"Shape mismatch for {variable.path}: checkpoint "
                f"{value.shape}, model {tuple(variable.shape)}."
            )
        variable.assign(value.astype(variable.dtype))

    emb = backbone.token_embedding
    put(emb.embeddings, weights["emb.weight"])
    put(emb.reverse_embeddings, _transpose(weights["head.weight"]))
    for norm, key in (
        (backbone.embeddings_layer_norm, "blocks.0.ln0"),
        (backbone.layer_norm, "ln_out"),
    ):
        put(norm.gamma, weights[f"{key}.weight"])
        put(norm.beta, weights[f"{key}.bias"])

    for i, block in enumerate(backbone.transformer_layers):
        p = f"blocks.{i}."
        for norm, key in ((block.ln1, "ln1"), (block.ln2, "ln2")):
            put(norm.gamma, weights[f"{p}{key}.weight"])
            put(norm.beta, weights[f"{p}{key}.bias"])
        tm, cm = block.time_mix, block.channel_mix
        put(tm.time_maa_x, _vector(weights[f"{p}att.time_maa_x"]))
        put(
            tm.time_maa,
            np.stack(
                [
                    _vector(weights[f"{p}att.time_maa_{m}"])
                    for m in ("w", "k", "v", "r", "g")
                ]
            ),
        )
        put(tm.time_maa_w1, weights[f"{p}att.time_maa_w1"])
        put(tm.time_maa_w2, weights[f"{p}att.time_maa_w2"])
        put(tm.time_decay, _vector(weights[f"{p}att.time_decay"]))
        put(tm.time_decay_w1, weights[f"{p}att.time_decay_w1"])
        put(tm.time_decay_w2, weights[f"{p}att.time_decay_w2"])
        put(tm.time_faaaa, weights[f"{p}att.time_faaaa"])
        put(tm.ln_x_gamma, weights[f"{p}att.ln_x.weight"])
        put(tm.ln_x_beta, weights[f"{p}att.ln_x.bias"])
        for name, dense in (
            ("receptance", tm.receptance),
            ("key", tm.key),
            ("value", tm.value),
            ("gate", tm.gate),
            ("output", tm.output_dense),
        ):
            put(dense.kernel, _transpose(weights[f"{p}att.{name}.weight"]))
        put(cm.time_maa_k, _vector(weights[f"{p}ffn.time_maa_k"]))
        put(cm.time_maa_r, _vector(weights[f"{p}ffn.time_maa_r"]))
        for name, dense in (
            ("key", cm.key),
            ("receptance", cm.receptance),
            ("value", cm.value),
        ):
            put(dense.kernel, _transpose(weights[f"{p}ffn.{name}.weight"]))
        if progress is not None:
            progress(i + 1)


def time_state_arrays(weights, num_layers, source="checkpoint"):
    """The RWKV-PEFT tuned WKV states `blocks.{i}.att.time_state`
    (stored `[H, N, N]` in (value, key) order) as one `[L, H, N, N]` array
    in our (key, value) order, or `None` if the file has none."""
    keys = [f"blocks.{i}.att.time_state" for i in range(num_layers)]
    present = [k for k in keys if k in weights]
    if not present:
        return None
    if len(present) != len(keys):
        missing = sorted(set(keys) - set(present))
        raise CheckpointError(
            f"{source} has time_state for {len(present)} of {len(keys)} "
            f"layers (missing {missing[0]}); it is not an RWKV-PEFT state "
            "for this model."
        )
    return np.stack(
        [np.swapaxes(np.asarray(weights[k], np.float32), -1, -2) for k in keys]
    )


def checkpoint_dtype(weights):
    """The floating dtype most of the checkpoint is stored in, as a Keras
    dtype name."""
    name = np.asarray(weights["emb.weight"][:1]).dtype.name
    return {"bfloat16": "bfloat16", "float16": "float16"}.get(name, "float32")


def check_finite(weights, source):
    """Raises `CheckpointError` naming the tensors that hold NaN or
    infinite values (a damaged or diverged checkpoint: every output would
    be NaN)."""
    bad = []
    for key, value in weights.items():
        array = np.asarray(value)
        if array.dtype.kind in "fV" and array.dtype.itemsize in (2, 4, 8):
            if not np.all(np.isfinite(array)):
                bad.append(key)
    if bad:
        raise CheckpointError(
            f"{source}: NaN or infinite values in {_listing(bad)}. The file "
            "is damaged or the training diverged; if it is meant to be so, "
            "convert with allow_non_finite=True (CLI: --allow-non-finite)."
        )


def _array(variable, dtype):
    from keras import ops

    return np.asarray(ops.convert_to_numpy(variable)).astype(dtype)


def state_dict(backbone, dtype=None):
    """The weights of `backbone` as a BlinkDL RWKV6 state dict (the
    inverse of `assign_weights`): numpy arrays, per-channel vectors as
    `[1, 1, C]`, LoRA adapters merged into their kernels.

    Args:
        backbone: an `RWKV6Backbone` (not quantized).
        dtype: numpy dtype of the arrays; default the backbone's variable
            dtype (bfloat16 for the official models).
    """
    dtype = np.dtype(dtype or backbone.variable_dtype)

    def put(key, variable, transpose=False, vector=False):
        value = _array(variable, dtype)
        if transpose:
            value = value.T
        if vector:
            value = value.reshape(1, 1, -1)
        sd[key] = value

    sd = {}
    emb = backbone.token_embedding
    put("emb.weight", emb.embeddings)
    put("head.weight", emb.reverse_embeddings, transpose=True)
    for norm, key in (
        (backbone.embeddings_layer_norm, "blocks.0.ln0"),
        (backbone.layer_norm, "ln_out"),
    ):
        put(f"{key}.weight", norm.gamma)
        put(f"{key}.bias", norm.beta)
    for i, block in enumerate(backbone.transformer_layers):
        p = f"blocks.{i}."
        for norm, key in ((block.ln1, "ln1"), (block.ln2, "ln2")):
            put(f"{p}{key}.weight", norm.gamma)
            put(f"{p}{key}.bias", norm.beta)
        tm, cm = block.time_mix, block.channel_mix
        put(f"{p}att.time_maa_x", tm.time_maa_x, vector=True)
        maa = _array(tm.time_maa, dtype)
        for row, m in zip(maa, ("w", "k", "v", "r", "g")):
            sd[f"{p}att.time_maa_{m}"] = row.reshape(1, 1, -1)
        put(f"{p}att.time_maa_w1", tm.time_maa_w1)
        put(f"{p}att.time_maa_w2", tm.time_maa_w2)
        put(f"{p}att.time_decay", tm.time_decay, vector=True)
        put(f"{p}att.time_decay_w1", tm.time_decay_w1)
        put(f"{p}att.time_decay_w2", tm.time_decay_w2)
        put(f"{p}att.time_faaaa", tm.time_faaaa)
        put(f"{p}att.ln_x.weight", tm.ln_x_gamma)
        put(f"{p}att.ln_x.bias", tm.ln_x_beta)
        for name, dense in (
            ("receptance", tm.receptance),
            ("key", tm.key),
            ("value", tm.value),
            ("gate", tm.gate),
            ("output", tm.output_dense),
        ):
            put(f"{p}att.{name}.weight", dense.kernel, transpose=True)
        put(f"{p}ffn.time_maa_k", cm.time_maa_k, vector=True)
        put(f"{p}ffn.time_maa_r", cm.time_maa_r, vector=True)
        for name, dense in (
            ("key", cm.key),
            ("receptance", cm.receptance),
            ("value", cm.value),
        ):
            put(f"{p}ffn.{name}.weight", dense.kernel, transpose=True)
    return sd


def time_state_dict(wkv):
    """`[L, H, N, N]` WKV states in our (key, value) order as RWKV-PEFT's
    `blocks.{i}.att.time_state` (value, key) entries."""
    return {
        f"blocks.{i}.att.time_state": np.ascontiguousarray(
            np.swapaxes(np.asarray(layer, np.float32), -1, -2)
        )
        for i, layer in enumerate(wkv)
    }
