"""Hugging Face RWKV6 model directories -> BlinkDL-keyed state dicts.

RWKV6 is published on Hugging Face in two layouts besides BlinkDL's
`.pth`, both with a `config.json` of `model_type` "rwkv6":

- transformers' remote-code layout (`RWKV/v6-Finch-1B6-HF`): BlinkDL's
  tensors under other names (`rwkv.blocks.N.attention.*`,
  `feed_forward.*`, `rwkv.embeddings`, `pre_ln`), same shapes;
- fla's layout (`fla-hub/rwkv-6-world-*`): `model.layers.N.attn.*` with
  the five token-shift mixes in the order r, w, k, v, g (BlinkDL: w, k, v,
  r, g), the mix LoRA as `x_proj`, the decay LoRA and base decay as
  `w_proj.linear.lora`, and `[C]` vectors where BlinkDL has `[1, 1, C]`.

Weights come from `*.safetensors` (read directly, `safetensors_file.py`)
or `pytorch_model.bin` (the same safe unpickler as `.pth` files), sharded
or not. Once renamed, the BlinkDL path takes over: dimension inference,
the key-by-key check, assignment.
"""

import json
import os
import re

import numpy as np

from keras_rwkv.convert.safetensors_file import load_safetensors
from keras_rwkv.convert.torch_checkpoint import CheckpointError
from keras_rwkv.convert.torch_checkpoint import load_torch_checkpoint

CONFIG_FILE = "config.json"
# (index file, single file, loader) in order of preference.
WEIGHT_FORMATS = (
    ("model.safetensors.index.json", "model.safetensors", load_safetensors),
    (
        "pytorch_model.bin.index.json",
        "pytorch_model.bin",
        load_torch_checkpoint,
    ),
)
# fla orders the five token-shift mixes r, w, k, v, g; BlinkDL w, k, v, r,
# g. FLA_TO_BLINKDL[i] is the fla row of BlinkDL's mix i.
FLA_MIXES = ("r", "w", "k", "v", "g")
FLA_TO_BLINKDL = [FLA_MIXES.index(m) for m in ("w", "k", "v", "r", "g")]


def read_config(directory):
    path = os.path.join(directory, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(
            f"{path} cannot be read ({type(e).__name__}: {e})."
        ) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object.")
    return config


def weight_files(directory):
    """The weight files of a Hugging Face model directory and their
    loader: the shards an index names, or the single file."""
    for index, single, loader in WEIGHT_FORMATS:
        index_path = os.path.join(directory, index)
        if os.path.isfile(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                names = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise CheckpointError(
                    f"{index_path} is not a shard index (no weight_map)."
                ) from None
            missing = [
                n
                for n in names
                if not os.path.isfile(os.path.join(directory, n))
            ]
            if missing:
                raise CheckpointError(
                    f"{directory} lacks {len(missing)} of the {len(names)} "
                    f"shards its {index} names ({missing[0]}, ...); "
                    "download the missing files."
                )
            return [os.path.join(directory, n) for n in names], loader
        if os.path.isfile(os.path.join(directory, single)):
            return [os.path.join(directory, single)], loader
    return [], None


def is_rwkv6_config(config):
    """Whether a Hugging Face `config.json` (as a dict) is an RWKV6 model
    in a transformers or fla layout (not a KerasHub preset's config)."""
    return (
        isinstance(config, dict)
        and config.get("model_type") == "rwkv6"
        and "registered_name" not in config
    )


def is_hf_dir(path):
    """Whether `path` is a Hugging Face model directory (a `config.json`
    of a transformers-style model, not a KerasHub preset, with weights)."""
    if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        return False
    try:
        config = read_config(path)
    except CheckpointError:
        return False
    return "model_type" in config and "registered_name" not in config


def _describe(keys, config):
    """What a checkpoint that is neither layout looks like, for errors."""
    model_type = config.get("model_type")
    if any(".attn.w_lora." in k or ".attn.a_lora." in k for k in keys):
        return "an RWKV-7 model (fla layout)"
    if any(k.endswith("attention.time_first") for k in keys):
        return "an RWKV-4 model (transformers layout)"
    if any(k.endswith("attention.time_faaaa") for k in keys):
        return "an RWKV-5 model (transformers layout)"
    if model_type:
        return f"a {model_type!r} model"
    sample = ", ".join(sorted(keys)[:3])
    return f"an unknown model (keys such as {sample})"


def detect_layout(keys, config):
    """`"transformers"` or `"fla"`; raises `CheckpointError` saying what
    the weights look like otherwise."""
    keys = list(keys)
    if any(k.endswith("attention.time_maa_w1") for k in keys):
        return "transformers"
    if any(".attn.x_proj.0.linear.weight" in k for k in keys):
        return "fla"
    raise CheckpointError(
        f"This looks like {_describe(keys, config)}, not RWKV-6: keras_rwkv "
        "reads RWKV-6 in the transformers layout (rwkv.blocks.N.attention.*, "
        "e.g. RWKV/v6-Finch-1B6-HF) or fla's (model.layers.N.attn.x_proj, "
        "e.g. fla-hub/rwkv-6-world-1.6B)."
    )


_TRANSFORMERS_RENAMES = (
    (r"rwkv\.embeddings\.", "emb."),
    (r"rwkv\.blocks\.0\.pre_ln\.", "blocks.0.ln0."),
    (r"rwkv\.blocks\.(\d+)\.attention\.", r"blocks.\1.att."),
    (r"rwkv\.blocks\.(\d+)\.feed_forward\.", r"blocks.\1.ffn."),
    (r"rwkv\.blocks\.", "blocks."),
    (r"rwkv\.ln_out\.", "ln_out."),
)


def _rename_transformers(tensors):
    out = {}
    for key, value in tensors.items():
        for pattern, replacement in _TRANSFORMERS_RENAMES:
            new = re.sub("^" + pattern, replacement, key)
            if new != key:
                key = new
                break
        out[key] = value
    return out


# fla name (after `model.layers.N.`) -> BlinkDL name (after `blocks.N.`),
# and whether the tensor is transposed on the way.
_FLA_LAYER = {
    "attn_norm.weight": ("ln1.weight", False),
    "attn_norm.bias": ("ln1.bias", False),
    "ffn_norm.weight": ("ln2.weight", False),
    "ffn_norm.bias": ("ln2.bias", False),
    "pre_norm.weight": ("ln0.weight", False),
    "pre_norm.bias": ("ln0.bias", False),
    "attn.x_proj.0.mu": ("att.time_maa_x", False),
    "attn.r_proj.linear.weight": ("att.receptance.weight", False),
    "attn.k_proj.linear.weight": ("att.key.weight", False),
    "attn.v_proj.linear.weight": ("att.value.weight", False),
    "attn.g_proj.linear.weight": ("att.gate.weight", False),
    "attn.o_proj.weight": ("att.output.weight", False),
    "attn.w_proj.linear.lora.0.weight": ("att.time_decay_w1", True),
    "attn.w_proj.linear.lora.2.weight": ("att.time_decay_w2", True),
    "attn.w_proj.linear.lora.2.bias": ("att.time_decay", False),
    "attn.bonus": ("att.time_faaaa", False),
    "attn.g_norm.weight": ("att.ln_x.weight", False),
    "attn.g_norm.bias": ("att.ln_x.bias", False),
    "ffn.key.mu": ("ffn.time_maa_k", False),
    "ffn.key.linear.weight": ("ffn.key.weight", False),
    "ffn.receptance.mu": ("ffn.time_maa_r", False),
    "ffn.receptance.linear.weight": ("ffn.receptance.weight", False),
    "ffn.value.weight": ("ffn.value.weight", False),
}
_FLA_TOP = {
    "model.embeddings.weight": "emb.weight",
    "model.norm.weight": "ln_out.weight",
    "model.norm.bias": "ln_out.bias",
    "lm_head.weight": "head.weight",
}


def _mix_lora(tensors, prefix, out, p):
    """fla's `x_proj` (the token-shift LoRA, mixes in fla's order) and
    `x_bias` into BlinkDL's `time_maa_w1`, `time_maa_w2` and the five
    `time_maa_*` vectors."""
    w1 = np.asarray(tensors.pop(prefix + "attn.x_proj.0.linear.weight"))
    w2 = np.asarray(tensors.pop(prefix + "attn.x_proj.2.weight"))
    bias = np.asarray(tensors.pop(prefix + "attn.x_bias"))
    c = w2.shape[0]
    # [5 * D, C] with rows in fla's mix order -> [C, 5 * D] in BlinkDL's.
    w1 = w1.reshape(5, -1, c)[FLA_TO_BLINKDL]
    out[p + "att.time_maa_w1"] = np.transpose(w1, (2, 0, 1)).reshape(c, -1)
    # [C, 5 * D] -> [5, D, C].
    w2 = np.transpose(w2.reshape(c, 5, -1), (1, 2, 0))
    out[p + "att.time_maa_w2"] = w2[FLA_TO_BLINKDL]
    for row, mix in zip(bias, FLA_MIXES):
        out[p + f"att.time_maa_{mix}"] = row


def _rename_fla(tensors):
    tensors = dict(tensors)
    out = {}
    layers = sorted(
        {
            int(m.group(1))
            for k in tensors
            if (m := re.match(r"model\.layers\.(\d+)\.", k))
        }
    )
    for i in layers:
        prefix, p = f"model.layers.{i}.", f"blocks.{i}."
        if prefix + "attn.x_proj.0.linear.weight" in tensors:
            _mix_lora(tensors, prefix, out, p)
        for name in [k for k in tensors if k.startswith(prefix)]:
            rest = name[len(prefix) :]
            if rest not in _FLA_LAYER:
                out[name] = tensors.pop(name)  # check_weights names it
                continue
            target, transpose = _FLA_LAYER[rest]
            value = tensors.pop(name)
            out[p + target] = np.transpose(value) if transpose else value
    for name, value in tensors.items():
        out[_FLA_TOP.get(name, name)] = value
    return out


def _tie_head(weights, config, directory):
    if "head.weight" in weights:
        return
    if config.get("tie_word_embeddings") and "emb.weight" in weights:
        weights["head.weight"] = weights["emb.weight"]
        return
    raise CheckpointError(
        f"{directory} has no output head (head.weight / lm_head.weight) and "
        "its config does not tie it to the embedding; the download is "
        "incomplete."
    )


def norm_epsilons(config, layout):
    """The LayerNorm and group-norm epsilons the weights were trained
    with, as `RWKV6Backbone` arguments."""
    if layout == "transformers":
        divisor = config.get("head_size_divisor", 8)
        return {
            "layer_norm_epsilon": float(config.get("layer_norm_epsilon", 1e-5)),
            "group_norm_epsilon": 1e-5 * float(divisor) ** 2,
        }
    # fla-hub's RWKV6 weights are BlinkDL's (fla's utils/convert_from_rwkv6
    # carries the group-norm epsilon over in memory only): keep BlinkDL's
    # group-norm epsilon, 64e-5.
    return {"layer_norm_epsilon": float(config.get("norm_eps", 1e-5))}


def load_hf_dir(directory):
    """Reads a Hugging Face RWKV6 model directory.

    Args:
        directory: holds `config.json` and the weights
            (`model.safetensors`, sharded `model-0000N-of-0000M.safetensors`
            with their index, or `pytorch_model.bin`, likewise).

    Returns:
        `(weights, extra_config)`: a dict keyed like a BlinkDL `.pth`
        (arrays memory-mapped where no reordering is needed), and the
        `RWKV6Backbone` arguments the weights do not show (epsilons).

    Raises:
        CheckpointError: no weights, missing shards, or a layout that is not
            RWKV-6 (the message says what it looks like).
    """
    directory = os.fspath(directory)
    config = read_config(directory)
    files, loader = weight_files(directory)
    if not files:
        raise CheckpointError(
            f"{directory} has a config.json but no weights (looked for "
            "model.safetensors, its sharded index, and pytorch_model.bin)."
        )
    tensors = {}
    for path in files:
        shard = loader(path)
        if not isinstance(shard, dict):
            raise CheckpointError(f"{path} is not a state dict of tensors.")
        tensors.update(shard)
    layout = detect_layout(tensors, config)
    if layout == "transformers":
        weights = _rename_transformers(tensors)
    else:
        weights = _rename_fla(tensors)
    _tie_head(weights, config, directory)
    return weights, norm_epsilons(config, layout)
