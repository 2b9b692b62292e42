"""RWKV6 weights saved by bert4keras3 (the seed system) -> BlinkDL keys.

bert4keras3 (`build_transformer_model(config, model="rwkv6")`) stores a
model as a directory such as ModelScope's `q935499957/RWKV6-1.6B-Keras`:

- `config.json`: the flat bert4keras3 config (`vocab_size`,
  `hidden_size`, `num_hidden_layers`, `decomposer_size`, ...),
- `model.weights.h5`: Keras 3 `save_weights` of the functional model,
- `rwkv_vocab_v20230424.txt`: the RWKV World vocabulary.

`load_bert4keras3_dir` reads the h5 with h5py (bert4keras3 itself is not
needed) and returns a dict of numpy arrays keyed exactly like a BlinkDL
RWKV6 state dict, so the `.pth` path's config inference, checks and
weight assignment apply unchanged.

The math is the same as BlinkDL's; only the parametrisation differs:
each of the five token-shift mixes is its own low-rank `DecomposerDense`
(`x + sx * (tanh(xxx @ a) @ b + bias)`), whose `a`, `b` and `bias` are a
column block of `time_maa_w1`, a slice of `time_maa_w2` and
`time_maa_{w,k,v,r,g}`; the decay is a `DecomposerDense` whose bias is
`time_decay`; the head GroupNorm is a Keras LayerNormalization over each
head (with its own per-channel gamma/beta shared by the heads) followed
by a per-head scale/offset, which fold into `ln_x`.
"""

import json
import os
import re

import ml_dtypes
import numpy as np

from keras_rwkv.convert.torch_checkpoint import CheckpointError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
VOCAB_FILE = "rwkv_vocab_v20230424.txt"

# bert4keras3 TimeMix attribute of each mix, in BlinkDL's order (w,k,v,r,g).
_MIXES = (
    ("w", "dense_xw"),
    ("k", "dense_xk"),
    ("v", "dense_xv"),
    ("r", "dense_xr"),
    ("g", "dense_xg"),
)
_TIME_MIX_DENSES = (
    ("receptance", "dense_r"),
    ("key", "dense_k"),
    ("value", "dense_v"),
    ("gate", "dense_g"),
    ("output", "dense_o"),
)
_CHANNEL_MIX_DENSES = (
    ("key", "dense_key"),
    ("receptance", "dense_receptance"),
    ("value", "dense_value"),
)
_TOP_LEVEL = re.compile(
    r"^(embedding|layer_normalization|time_mix|channel_mix|dense)(?:_(\d+))?$"
)
# Layer names bert4keras3 gives (stored as h5 attributes by recent Keras 3
# releases; older files are ordered by Keras's numeric suffixes instead).
_NAMES = {
    "embedding": re.compile(r"^Embedding-Token$"),
    "time_mix": re.compile(r"^RWKV-(\d+)-TimeMix$"),
    "channel_mix": re.compile(r"^RWKV-(\d+)-ChannelMix$"),
    "dense": re.compile(r"^RWKV-LM$"),
}


def is_bert4keras3_dir(path):
    """Whether `path` looks like a bert4keras3 model directory.

    True for a directory holding any of `config.json`, `model.weights.h5`
    or `rwkv_vocab_v20230424.txt` that is not a KerasHub preset (which has
    `metadata.json` and a `config.json` naming a Keras class). An
    incomplete export still counts, so that loading it says which file
    is missing.

    Args:
        path: a filesystem path.

    Returns:
        `bool`.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        return False
    if os.path.exists(os.path.join(path, "metadata.json")):
        return False
    try:
        with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
            config = json.load(f)
        if isinstance(config, dict) and _is_keras_hub_config(config):
            return False
    except (OSError, ValueError):
        pass
    return any(
        os.path.isfile(os.path.join(path, name))
        for name in (CONFIG_FILE, WEIGHTS_FILE, VOCAB_FILE)
    )


def _is_keras_hub_config(config):
    return "class_name" in config or "registered_name" in config


def load_bert4keras3_dir(path):
    """Reads a bert4keras3 RWKV6 directory as a BlinkDL RWKV6 state dict.

    Args:
        path: directory holding `config.json` and `model.weights.h5` (and
            normally `rwkv_vocab_v20230424.txt`, which is not needed: the
            converted preset uses keras_rwkv's copy of the same vocabulary).

    Returns:
        `dict` of BlinkDL key (`"emb.weight"`, `"blocks.0.att.time_maa_x"`,
        ...) to numpy array in BlinkDL's shapes, in the h5's storage dtype
        (float32, or bfloat16 as `ml_dtypes.bfloat16`).

    Raises:
        CheckpointError: a file is missing or unreadable, the config is not
            an RWKV6 config, or the h5 does not hold the expected weights.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory.")
    missing = [
        name
        for name in (CONFIG_FILE, WEIGHTS_FILE)
        if not os.path.isfile(os.path.join(path, name))
    ]
    if missing:
        raise CheckpointError(
            f"{path} is not a complete bert4keras3 RWKV6 export: missing "
            f"{', '.join(missing)}. A bert4keras3 model directory (e.g. "
            "ModelScope q935499957/RWKV6-1.6B-Keras) holds config.json, "
            "model.weights.h5 and rwkv_vocab_v20230424.txt."
        )
    config = _read_config(os.path.join(path, CONFIG_FILE))
    weights = _read_weights(os.path.join(path, WEIGHTS_FILE))
    _check_against_config(weights, config, path)
    return weights


def _read_config(config_path):
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"Cannot read {config_path} as JSON: {e}"
        ) from None
    if not isinstance(config, dict) or _is_keras_hub_config(config):
        raise CheckpointError(
            f"{config_path} is not a bert4keras3 config (a flat JSON object "
            "with hidden_size, num_hidden_layers, decomposer_size, ...)."
        )
    model_type = str(config.get("model_type", "rwkv6")).lower()
    if "decomposer_size" not in config or model_type != "rwkv6":
        raise CheckpointError(
            f"{config_path} is not an RWKV6 config (bert4keras3 RWKV6 "
            "configs have `decomposer_size`, the token-shift LoRA rank"
            f"; model_type: {config.get('model_type')!r}). keras_rwkv "
            "converts RWKV-6 (x060) models only."
        )
    return config


def _check_against_config(weights, config, path):
    """The config must describe the weights it ships with."""
    vocab, hidden = weights["emb.weight"].shape
    head_size = weights["blocks.0.att.time_faaaa"].shape[1]
    layers = 1 + max(
        int(k.split(".")[1]) for k in weights if k.startswith("blocks.")
    )
    found = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": weights["blocks.0.ffn.key.weight"].shape[0],
        "decomposer_size": weights["blocks.0.att.time_maa_w2"].shape[1],
        "time_decay_size": weights["blocks.0.att.time_decay_w1"].shape[1],
    }
    if not config.get("keep_tokens") and not config.get("compound_tokens"):
        found["vocab_size"] = vocab
    declared = dict(config)
    heads, width = config.get("num_attention_heads"), config.get("hidden_size")
    if not config.get("attention_head_size") and _positive_int(heads):
        if _positive_int(width):
            declared["attention_head_size"] = width // heads
    found["attention_head_size"] = head_size
    wrong = [
        f"{key}={declared[key]} (weights: {value})"
        for key, value in found.items()
        if isinstance(declared.get(key), int) and declared[key] != value
    ]
    if wrong:
        raise CheckpointError(
            f"{path}: config.json does not match model.weights.h5: "
            + ", ".join(wrong)
            + ". The two files come from different models."
        )


def _positive_int(x):
    return isinstance(x, int) and x > 0


def _read_weights(h5_path):
    import h5py

    try:
        f = h5py.File(h5_path, "r")
    except OSError as e:
        raise CheckpointError(
            f"Cannot open {h5_path} as HDF5 ({e}); the file is truncated "
            "or not a Keras weights file. Download it again."
        ) from None
    with f:
        try:
            return _to_blinkdl(f)
        except KeyError as e:
            raise CheckpointError(
                f"{h5_path} lacks the weights of a bert4keras3 RWKV6 model "
                f"({e.args[0]}). It may come from another architecture, "
                "from a model built without the LM head (with_lm=False), "
                "or be damaged."
            ) from None


def _vars(group, count, where):
    """The `count` arrays under `group/vars`, in order."""
    if "vars" not in group:
        raise KeyError(f"no weights at {where}")
    stored = group["vars"]
    keys = sorted(stored.keys(), key=int)
    if len(keys) != count:
        raise KeyError(
            f"{where} holds {len(keys)} weight(s), expected {count} (a "
            "LoRA or state-tuning layer? merge or drop it before saving)"
        )
    return [_array(stored[k]) for k in keys]


def _array(dataset):
    if dataset.attrs.get("dtype") == "bfloat16":
        return np.array(dataset, dtype=ml_dtypes.bfloat16)
    return np.array(dataset)


def _name_attr(group):
    if "vars" not in group:
        return None
    name = group["vars"].attrs.get("name")
    if isinstance(name, bytes):
        name = name.decode()
    return name


def _top_level_layers(f):
    """The bert4keras3 layers of the h5, by kind, in model order."""
    if "layers" not in f:
        raise KeyError("no top-level `layers` group")
    found = {}
    for key in f["layers"]:
        m = _TOP_LEVEL.match(key)
        if m:
            suffix = int(m.group(2)) if m.group(2) else 0
            found.setdefault(m.group(1), []).append((suffix, key))
    layers = {
        kind: [f["layers"][key] for _, key in sorted(items)]
        for kind, items in found.items()
    }
    # Prefer the stored bert4keras3 layer names where Keras wrote them.
    for kind, pattern in _NAMES.items():
        groups = layers.get(kind, [])
        names = [_name_attr(g) for g in groups]
        if not groups or any(n is None for n in names):
            continue
        matched = [(pattern.match(n), g) for n, g in zip(names, groups)]
        matched = [(m, g) for m, g in matched if m]
        if kind in ("time_mix", "channel_mix"):
            matched.sort(key=lambda mg: int(mg[0].group(1)))
        layers[kind] = [g for _, g in matched]
    norms = layers.get("layer_normalization", [])
    names = [_name_attr(g) for g in norms]
    if norms and all(n is not None for n in names):
        layers["layer_normalization"] = _norms_by_name(norms, names)
    return layers


def _norms_by_name(norms, names):
    """Orders the LayerNorms as Embedding-LN, (ln1, ln2) per block,
    Out-LN from their bert4keras3 names."""
    order = {}
    for group, name in zip(norms, names):
        if name == "Embedding-LN":
            order[(-1, 0)] = group
        elif name == "Out-LN":
            order[(1 << 30, 0)] = group
        elif m := re.match(r"^RWKV-(\d+)-(TimeMix|ChannelMix)-Norm$", name):
            order[(int(m.group(1)), m.group(2) == "ChannelMix")] = group
    return [order[k] for k in sorted(order)]


def _to_blinkdl(f):
    layers = _top_level_layers(f)
    time_mixes = layers.get("time_mix", [])
    channel_mixes = layers.get("channel_mix", [])
    norms = layers.get("layer_normalization", [])
    num_layers = len(time_mixes)
    if not num_layers:
        raise KeyError("no RWKV TimeMix layers")
    if len(channel_mixes) != num_layers:
        raise KeyError(
            f"{num_layers} TimeMix but {len(channel_mixes)} ChannelMix layers"
        )
    if len(norms) != 2 * num_layers + 2:
        raise KeyError(
            f"{len(norms)} LayerNormalization layers, expected "
            f"{2 * num_layers + 2} for {num_layers} blocks"
        )
    if len(layers.get("embedding", [])) != 1:
        raise KeyError("no single Embedding-Token layer")
    if len(layers.get("dense", [])) != 1:
        raise KeyError("no RWKV-LM head (Dense) layer")

    (emb,) = _vars(layers["embedding"][0], 1, "Embedding-Token")
    (head,) = _vars(layers["dense"][0], 1, "RWKV-LM")
    weights = {"emb.weight": emb, "head.weight": np.transpose(head)}

    def norm(group, key, where):
        gamma, beta = _vars(group, 2, where)
        weights[f"{key}.weight"], weights[f"{key}.bias"] = gamma, beta

    norm(norms[0], "blocks.0.ln0", "Embedding-LN")
    norm(norms[-1], "ln_out", "Out-LN")
    for i in range(num_layers):
        p = f"blocks.{i}."
        norm(norms[1 + 2 * i], p + "ln1", f"RWKV-{i}-TimeMix-Norm")
        norm(norms[2 + 2 * i], p + "ln2", f"RWKV-{i}-ChannelMix-Norm")
        weights.update(_time_mix(time_mixes[i], p, f"RWKV-{i}-TimeMix"))
        weights.update(
            _channel_mix(channel_mixes[i], p, f"RWKV-{i}-ChannelMix")
        )
    return weights


def _vector(x):
    return np.reshape(x, (1, 1, -1))


def _time_mix(g, p, where):
    (maa_x, faaaa) = _vars(g, 2, where)
    out = {p + "att.time_maa_x": _vector(maa_x), p + "att.time_faaaa": faaaa}
    w1, w2 = [], []
    for mix, attr in _MIXES:
        (a,) = _vars(g[attr]["dense_a"], 1, f"{where}/{attr}/dense_a")
        b, bias = _vars(g[attr]["dense_b"], 2, f"{where}/{attr}/dense_b")
        w1.append(a)
        w2.append(b)
        out[p + f"att.time_maa_{mix}"] = _vector(bias)
    out[p + "att.time_maa_w1"] = np.concatenate(w1, axis=1)
    out[p + "att.time_maa_w2"] = np.stack(w2)
    (a,) = _vars(g["dense_w"]["dense_a"], 1, f"{where}/dense_w/dense_a")
    b, bias = _vars(g["dense_w"]["dense_b"], 2, f"{where}/dense_w/dense_b")
    out[p + "att.time_decay_w1"] = a
    out[p + "att.time_decay_w2"] = b
    out[p + "att.time_decay"] = _vector(bias)
    for name, attr in _TIME_MIX_DENSES:
        (kernel,) = _vars(g[attr], 1, f"{where}/{attr}")
        out[p + f"att.{name}.weight"] = np.transpose(kernel)
    # GroupNorm = per-head scale/offset [H, N] after a LayerNormalization
    # over each head whose gamma/beta [N] are shared by the heads.
    scale, offset = _vars(g["group_norm"], 2, f"{where}/group_norm")
    gamma, beta = _vars(
        g["group_norm"]["group_ln"], 2, f"{where}/group_norm/group_ln"
    )
    dtype = scale.dtype
    scale, offset = scale.astype(np.float32), offset.astype(np.float32)
    gamma, beta = gamma.astype(np.float32), beta.astype(np.float32)
    out[p + "att.ln_x.weight"] = (scale * gamma).reshape(-1).astype(dtype)
    out[p + "att.ln_x.bias"] = (scale * beta + offset).reshape(-1).astype(dtype)
    return out


def _channel_mix(g, p, where):
    maa_k, maa_r = _vars(g, 2, where)
    out = {p + "ffn.time_maa_k": _vector(maa_k)}
    out[p + "ffn.time_maa_r"] = _vector(maa_r)
    for name, attr in _CHANNEL_MIX_DENSES:
        (kernel,) = _vars(g[attr], 1, f"{where}/{attr}")
        out[p + f"ffn.{name}.weight"] = np.transpose(kernel)
    return out
