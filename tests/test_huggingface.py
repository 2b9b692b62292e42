"""Hugging Face RWKV6 layouts in, BlinkDL `.pth` out.

The HF directories are written here from a random BlinkDL state dict
with the public `safetensors` and `torch` writers, following each layout
as its own code defines it (transformers' remote-code `modeling_rwkv6.py`:
BlinkDL's tensors renamed; fla's `utils/convert_from_rwkv6.py`: the mixes
reordered r, w, k, v, g, the LoRAs transposed). The reference is
BlinkDL's `rwkv` on the original `.pth`. Tolerance 1e-4 relative (fp32).
"""

import json

import keras
import numpy as np
import pytest
import torch
from keras import ops
from safetensors.torch import save_file

from keras_rwkv.cli import main as cli_main
from keras_rwkv.convert import CheckpointError
from keras_rwkv.convert import convert_checkpoint
from keras_rwkv.convert import export_blinkdl
from keras_rwkv.convert import load_safetensors
from tests.reference import blinkdl_forward
from tests.reference import blinkdl_model
from tests.reference import random_rwkv6_state_dict
from tests.reference import relative_error
from tests.reference import save_checkpoint

TOL = 1e-4

# Reading and caching files is the same on every backend (the forward pass
# is compared with BlinkDL's on each in test_blinkdl_parity.py).
pytestmark = pytest.mark.skipif(
    keras.config.backend() != "jax", reason="backend-independent; JAX pass"
)
DIMS = dict(vocab=120, layers=2, hidden=128, ffn=256, d_mix=8, d_dec=16)


def transformers_layout(sd):
    out = {}
    for key, value in sd.items():
        if key == "emb.weight":
            key = "rwkv.embeddings.weight"
        elif key.startswith("blocks.0.ln0."):
            key = "rwkv.blocks.0.pre_ln." + key.split(".")[-1]
        elif key.startswith("ln_out."):
            key = "rwkv." + key
        elif key.startswith("blocks."):
            key = "rwkv." + key.replace(".att.", ".attention.").replace(
                ".ffn.", ".feed_forward."
            )
        out[key] = value
    return out


def fla_layout(sd, layers):
    out = {
        "model.embeddings.weight": sd["emb.weight"],
        "model.norm.weight": sd["ln_out.weight"],
        "model.norm.bias": sd["ln_out.bias"],
        "lm_head.weight": sd["head.weight"],
        "model.layers.0.pre_norm.weight": sd["blocks.0.ln0.weight"],
        "model.layers.0.pre_norm.bias": sd["blocks.0.ln0.bias"],
    }
    for i in range(layers):
        b, m = f"blocks.{i}.", f"model.layers.{i}."
        att = b + "att."
        c = sd[att + "time_maa_x"].numel()
        ww, wk, wv, wr, wg = sd[att + "time_maa_w1"].view(c, 5, -1).unbind(-2)
        out[m + "attn.x_proj.0.linear.weight"] = torch.cat(
            (wr, ww, wk, wv, wg), -1
        ).t()
        ww, wk, wv, wr, wg = sd[att + "time_maa_w2"].unbind(0)
        out[m + "attn.x_proj.2.weight"] = torch.cat((wr, ww, wk, wv, wg), 0).t()
        out[m + "attn.x_proj.0.mu"] = sd[att + "time_maa_x"].view(-1)
        out[m + "attn.x_bias"] = torch.stack(
            [sd[att + f"time_maa_{x}"].view(-1) for x in "rwkvg"]
        )
        for fla, ours in (
            ("r_proj.linear", "receptance"),
            ("k_proj.linear", "key"),
            ("v_proj.linear", "value"),
            ("g_proj.linear", "gate"),
            ("o_proj", "output"),
        ):
            out[m + f"attn.{fla}.weight"] = sd[att + f"{ours}.weight"]
        lora = m + "attn.w_proj.linear.lora."
        out[lora + "0.weight"] = sd[att + "time_decay_w1"].t()
        out[lora + "2.weight"] = sd[att + "time_decay_w2"].t()
        out[lora + "2.bias"] = sd[att + "time_decay"].view(-1)
        out[m + "attn.bonus"] = sd[att + "time_faaaa"]
        out[m + "attn.g_norm.weight"] = sd[att + "ln_x.weight"]
        out[m + "attn.g_norm.bias"] = sd[att + "ln_x.bias"]
        for norm, ours in (("attn_norm", "ln1"), ("ffn_norm", "ln2")):
            for p in ("weight", "bias"):
                out[m + f"{norm}.{p}"] = sd[b + f"{ours}.{p}"]
        out[m + "ffn.key.mu"] = sd[b + "ffn.time_maa_k"].view(-1)
        out[m + "ffn.receptance.mu"] = sd[b + "ffn.time_maa_r"].view(-1)
        for name in ("key", "receptance"):
            out[m + f"ffn.{name}.linear.weight"] = sd[b + f"ffn.{name}.weight"]
        out[m + "ffn.value.weight"] = sd[b + "ffn.value.weight"]
    return out


def hf_config(layout):
    d = DIMS
    if layout == "transformers":
        return {
            "model_type": "rwkv6",
            "architectures": ["Rwkv6ForCausalLM"],
            "vocab_size": d["vocab"],
            "hidden_size": d["hidden"],
            "num_hidden_layers": d["layers"],
            "attention_hidden_size": d["hidden"],
            "head_size": 64,
            "head_size_divisor": 8,
            "intermediate_size": d["ffn"],
            "layer_norm_epsilon": 1e-5,
            "tie_word_embeddings": False,
        }
    return {
        "model_type": "rwkv6",
        "architectures": ["RWKV6ForCausalLM"],
        "vocab_size": d["vocab"],
        "hidden_size": d["hidden"],
        "num_hidden_layers": d["layers"],
        "num_heads": d["hidden"] // 64,
        "expand_k": 1.0,
        "proj_low_rank_dim": d["d_mix"],
        "gate_low_rank_dim": d["d_dec"],
        "intermediate_size": d["ffn"],
        "norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }


def write_hf_dir(directory, tensors, config, fmt="safetensors", shards=1):
    """`config.json` and the weights, in `shards` files with an index when
    more than one (as `save_pretrained` does)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    keys = sorted(tensors)
    stem, ext = ("model", "safetensors")
    if fmt == "bin":
        stem, ext = ("pytorch_model", "bin")
    groups = [keys[i::shards] for i in range(shards)]
    weight_map = {}
    for n, group in enumerate(groups, 1):
        name = f"{stem}.{ext}"
        if shards > 1:
            name = f"{stem}-{n:05d}-of-{shards:05d}.{ext}"
        part = {k: tensors[k].contiguous() for k in group}
        if fmt == "bin":
            torch.save(part, directory / name)
        else:
            save_file(part, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in group})
    if shards > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (directory / f"{stem}.{ext}.index.json").write_text(json.dumps(index))
    return directory


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random BlinkDL checkpoint, its `.pth` and BlinkDL's logits."""
    sd = random_rwkv6_state_dict(**DIMS, seed=11)
    root = tmp_path_factory.mktemp("hf")
    pth = save_checkpoint(root / "model.pth", sd)
    tokens = np.random.default_rng(5).integers(1, DIMS["vocab"], 20).tolist()
    logits, _, _ = blinkdl_forward(blinkdl_model(pth), tokens)
    return sd, root, tokens, logits


def our_logits(backbone, tokens):
    hidden, _ = backbone.call_with_state(np.array([tokens]))
    return ops.convert_to_numpy(backbone.token_embedding(hidden, reverse=True))[
        0
    ]


@pytest.mark.parametrize(
    "layout, fmt, shards",
    [
        ("transformers", "safetensors", 1),
        ("transformers", "safetensors", 3),
        ("transformers", "bin", 2),
        ("fla", "safetensors", 2),
        ("fla", "bin", 1),
    ],
)
def test_hf_layouts_convert_to_blinkdl_logits(reference, layout, fmt, shards):
    sd, root, tokens, ref = reference
    tensors = (
        transformers_layout(sd)
        if layout == "transformers"
        else fla_layout(sd, DIMS["layers"])
    )
    directory = write_hf_dir(
        root / f"{layout}-{fmt}-{shards}",
        tensors,
        hf_config(layout),
        fmt,
        shards,
    )
    backbone = convert_checkpoint(directory, dtype="float32", progress=False)
    assert backbone.num_layers == DIMS["layers"]
    assert backbone.mix_lora_dim == DIMS["d_mix"]
    assert backbone.group_norm_epsilon == pytest.approx(64e-5)
    assert relative_error(our_logits(backbone, tokens), ref) <= TOL


def test_fla_mix_order_matters(reference):
    # Reading fla's mixes in BlinkDL's order must break the tolerance (the
    # test above would not notice a layout read twice the same wrong way
    # otherwise).
    sd, root, tokens, ref = reference
    swapped = dict(sd)
    for i in range(DIMS["layers"]):
        a, b = f"blocks.{i}.att.time_maa_r", f"blocks.{i}.att.time_maa_w"
        swapped[a], swapped[b] = sd[b], sd[a]
    directory = write_hf_dir(
        root / "fla-swapped",
        fla_layout(swapped, DIMS["layers"]),
        hf_config("fla"),
    )
    backbone = convert_checkpoint(directory, dtype="float32", progress=False)
    assert relative_error(our_logits(backbone, tokens), ref) > 100 * TOL


def test_cli_converts_an_hf_directory(reference, tmp_path):
    import keras_hub

    sd, root, tokens, ref = reference
    directory = write_hf_dir(
        tmp_path / "RWKV6-HF",
        transformers_layout(sd),
        hf_config("transformers"),
    )
    (directory / "rwkv_vocab_v20230424.txt").write_text("vocabulary\n")
    out = tmp_path / "preset"
    args = ["convert", str(directory), str(out), "--dtype", "float32"]
    assert cli_main(args) == 0
    backbone = keras_hub.models.Backbone.from_preset(str(out))
    assert relative_error(our_logits(backbone, tokens), ref) <= TOL


def test_tied_head_is_read_from_the_embedding(reference, tmp_path):
    sd, root, tokens, _ = reference
    tied = dict(sd)
    tied["head.weight"] = sd["emb.weight"]
    pth = save_checkpoint(tmp_path / "tied.pth", tied)
    ref, _, _ = blinkdl_forward(blinkdl_model(pth), tokens)
    tensors = transformers_layout(tied)
    del tensors["head.weight"]
    config = {**hf_config("transformers"), "tie_word_embeddings": True}
    directory = write_hf_dir(tmp_path / "tied", tensors, config)
    backbone = convert_checkpoint(directory, dtype="float32", progress=False)
    assert relative_error(our_logits(backbone, tokens), ref) <= TOL
    config["tie_word_embeddings"] = False
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no output head"):
        convert_checkpoint(directory, progress=False)


@pytest.mark.parametrize(
    "keys, model_type, looks_like",
    [
        (["model.layers.0.self_attn.q_proj.weight"], "llama", "'llama' model"),
        (["model.layers.0.attn.w_lora.lora.0.weight"], "rwkv7", "RWKV-7"),
        (["rwkv.blocks.0.attention.time_first"], "rwkv", "RWKV-4"),
        (["rwkv.blocks.0.attention.time_faaaa"], "rwkv5", "RWKV-5"),
    ],
)
def test_an_unknown_layout_says_what_it_looks_like(
    tmp_path, keys, model_type, looks_like
):
    tensors = {k: torch.zeros(2, 2) for k in keys}
    directory = write_hf_dir(
        tmp_path / "m", tensors, {"model_type": model_type}
    )
    with pytest.raises(CheckpointError, match=f"looks like an? {looks_like}"):
        convert_checkpoint(directory, progress=False)


def test_hf_directory_errors(reference, tmp_path):
    sd, *_ = reference
    config = hf_config("transformers")
    directory = write_hf_dir(
        tmp_path / "sharded", transformers_layout(sd), config, shards=2
    )
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lacks 1 of the 2 shards"):
        convert_checkpoint(directory, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no weights"):
        convert_checkpoint(empty, progress=False)


def test_safetensors_reader_matches_the_library(tmp_path):
    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(7).to(torch.bfloat16),
        "f16": torch.randn(2, 2).to(torch.float16),
        "i64": torch.arange(6).view(2, 3),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    ours = load_safetensors(path)
    assert set(ours) == set(tensors)
    for name, ref in tensors.items():
        got = np.asarray(ours[name]).astype(np.float64)
        np.testing.assert_array_equal(got, ref.double().numpy())
        assert got.shape == tuple(ref.shape)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        load_safetensors(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="impossible"):
        load_safetensors(tmp_path / "junk.safetensors")


# --- export to BlinkDL ---------------------------------------------------


def perturbed(backbone, seed):
    """Every weight moved by random noise, so that an export of the
    converted values could not pass by accident."""
    rng = np.random.default_rng(seed)
    for v in backbone.trainable_weights:
        value = ops.convert_to_numpy(v)
        v.assign(value + rng.normal(0, 0.02, value.shape).astype(value.dtype))


def test_exported_pth_runs_in_blinkdl_with_our_logits(reference, tmp_path):
    sd, root, tokens, _ = reference
    backbone = convert_checkpoint(
        root / "model.pth", dtype="float32", progress=False
    )
    perturbed(backbone, 1)
    path = export_blinkdl(backbone, tmp_path / "exported.pth")
    ref, _, _ = blinkdl_forward(blinkdl_model(path), tokens)
    assert relative_error(our_logits(backbone, tokens), ref) <= TOL
    # And back: the file converts to the same model.
    again = convert_checkpoint(path, dtype="float32", progress=False)
    for a, b in zip(again.get_weights(), backbone.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_export_merges_lora_and_keeps_a_tuned_state(reference, tmp_path):
    sd, root, tokens, _ = reference
    backbone = convert_checkpoint(
        root / "model.pth", dtype="float32", progress=False
    )
    backbone.enable_lora(rank=4)
    perturbed(backbone, 2)  # the LoRA weights (the only trainable ones)
    rng = np.random.default_rng(3)
    h = DIMS["hidden"] // 64
    wkv = rng.normal(0, 0.3, (DIMS["layers"], h, 64, 64)).astype("float32")
    backbone.set_tuned_state_arrays(wkv)
    path = export_blinkdl(backbone, tmp_path / "lora.pth")
    ref, _, _ = blinkdl_forward(blinkdl_model(path), tokens)
    assert relative_error(our_logits(backbone, tokens), ref) <= TOL

    backbone.set_tuned_state_arrays(wkv, np.ones((DIMS["layers"], 2, 128)))
    with pytest.raises(ValueError, match="drop_time_shift"):
        export_blinkdl(backbone, tmp_path / "shift.pth")
    assert not (tmp_path / "shift.pth").exists()


def test_export_dtype_and_refusals(reference, tmp_path):
    sd, root, _, _ = reference
    backbone = convert_checkpoint(
        root / "model.pth", dtype="float32", progress=False
    )
    path = export_blinkdl(backbone, tmp_path / "bf16.pth", dtype="bfloat16")
    loaded = torch.load(path, weights_only=True, mmap=True)
    assert loaded["emb.weight"].dtype == torch.bfloat16
    assert tuple(loaded["blocks.1.att.time_maa_k"].shape) == (1, 1, 128)
    assert set(loaded) == set(sd)
    with pytest.raises(ValueError, match="dtype='int8'"):
        export_blinkdl(backbone, tmp_path / "x.pth", dtype="int8")


def test_cli_export(reference, tmp_path, capsys):
    sd, root, tokens, ref = reference
    preset = tmp_path / "preset"
    convert = ["convert", str(root / "model.pth"), str(preset)]
    assert cli_main([*convert, "--dtype", "float32"]) == 0
    out = tmp_path / "back.pth"
    assert cli_main(["export", str(preset), str(out)]) == 0
    exported, _, _ = blinkdl_forward(blinkdl_model(out), tokens)
    assert relative_error(exported, ref) <= TOL
    capsys.readouterr()
    assert cli_main(["export", str(preset), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
