"""bert4keras3 (seed system) RWKV6 directories -> keras_rwkv.

A tiny RWKV6 is built by bert4keras3 itself in a subprocess (it sets
global Keras state and environment variables), given random weights of
realistic scale (bert4keras3's own init leaves every bias, decay and norm
at 0 or 1, which would hide mapping mistakes), saved as a bert4keras3
directory, and run; its logits are the reference. Tolerance: 1e-4
relative (max |diff| / max |reference|).
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import h5py
import ml_dtypes
import numpy as np
import pytest
from keras import ops

import keras_rwkv.models.rwkv6 as rwkv6_package
from keras_rwkv import RWKV6Backbone
from keras_rwkv.cli import main as cli_main
from keras_rwkv.convert import CheckpointError
from keras_rwkv.convert import convert_checkpoint
from keras_rwkv.convert.bert4keras3 import is_bert4keras3_dir
from keras_rwkv.convert.bert4keras3 import load_bert4keras3_dir
from keras_rwkv.models.rwkv6.rwkv6_tokenizer import VOCAB_FILENAME
from tests.fake_network import resolve_every_name
from tests.reference import relative_error

TOL = 1e-4
VOCAB, HIDDEN, FFN, D_MIX, D_DEC = 300, 128, 448, 8, 16
CONFIG = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "attention_head_size": 64,
    "intermediate_size": FFN,
    "decomposer_size": D_MIX,
    "time_decay_size": D_DEC,
}

# Runs with KERAS_BACKEND=jax OPS_KERNEL=1 (bert4keras3's keras.ops WKV).
# argv: output dir, vocabulary file, config JSON.
SCRIPT = r"""
import json, os, shutil, sys
import numpy as np
from bert4keras3.models import build_transformer_model

out, vocab, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
C, F, V = config["hidden_size"], config["intermediate_size"], config[
    "vocab_size"]
with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f)
model = build_transformer_model(
    os.path.join(out, "config.json"), model="rwkv6", with_lm="linear"
)
rng = np.random.default_rng(0)
done = set()

def put(var, lo_or_std, hi=None):
    shape = tuple(var.shape)
    if hi is None:
        x = rng.normal(0.0, lo_or_std, shape)
    else:
        x = rng.uniform(lo_or_std, hi, shape)
    var.assign(x.astype("float32"))
    done.add(id(var))

def norm(ln):
    put(ln.gamma, 0.5, 1.5)
    put(ln.beta, 0.1)

for layer in model.layers:
    kind = type(layer).__name__
    if kind == "LayerNormalization":
        norm(layer)
    elif kind == "Embedding":
        put(layer.embeddings, 1.0)
    elif kind == "Dense":
        put(layer.kernel, C ** -0.5)
    elif kind == "TimeMix":
        put(layer.time_mix_x, 0.0, 1.0)
        put(layer.time_faaaa, 0.5)
        for m in "wkvrg":
            d = getattr(layer, "dense_x" + m)
            put(d.dense_a.kernel, 0.1)
            put(d.dense_b.kernel, 0.1)
            put(d.dense_b.bias, 0.0, 1.0)
        put(layer.dense_w.dense_a.kernel, 0.1)
        put(layer.dense_w.dense_b.kernel, 0.1)
        put(layer.dense_w.dense_b.bias, -6.0, 1.0)  # time_decay
        for m in "rkvgo":
            put(getattr(layer, "dense_" + m).kernel, C ** -0.5)
        put(layer.group_norm.scale, 0.5, 1.5)
        put(layer.group_norm.offset, 0.1)
        norm(layer.group_norm.group_ln)
    elif kind == "ChannelMix":
        put(layer.time_mix_k, 0.0, 1.0)
        put(layer.time_mix_r, 0.0, 1.0)
        put(layer.dense_key.kernel, C ** -0.5)
        put(layer.dense_receptance.kernel, C ** -0.5)
        put(layer.dense_value.kernel, F ** -0.5)
left = [w.path for w in model.weights if id(w) not in done]
assert not left, f"weights left at bert4keras3's init: {left}"
model.save_weights(os.path.join(out, "model.weights.h5"))
shutil.copy(vocab, os.path.join(out, "rwkv_vocab_v20230424.txt"))

# Token 0 is padding to bert4keras3 (see test_token_zero_is_padding...).
ids = rng.integers(1, V, size=(2, 24)).astype("int32")
with_zero = ids.copy()
with_zero[:, 9] = 0
for name, x in (("ids", ids), ("ids_zero", with_zero)):
    np.save(os.path.join(out, name + ".npy"), x)
    logits = np.asarray(model.predict(x, verbose=0), "float32")
    np.save(os.path.join(out, name + "_logits.npy"), logits)
"""


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A bert4keras3 RWKV6 directory plus reference ids/logits (kept
    outside it, in `ref/`)."""
    for module in ("bert4keras3", "rwkv6_keras_operator", "six"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(
                f"{module} not installed (pip install bert4keras3==1.6.6 "
                "rwkv6-keras-operator six)"
            )
    root = tmp_path_factory.mktemp("b4k")
    out = root / "RWKV6-tiny-Keras"
    out.mkdir()
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "OPS_KERNEL": "1",
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    vocab = os.path.join(
        os.path.dirname(rwkv6_package.__file__), VOCAB_FILENAME
    )
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(out), vocab, json.dumps(CONFIG)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ref = root / "ref"
    ref.mkdir()
    for name in os.listdir(out):
        if name.endswith(".npy"):
            shutil.move(str(out / name), str(ref / name))
    assert sorted(os.listdir(out)) == [
        "config.json",
        "model.weights.h5",
        "rwkv_vocab_v20230424.txt",
    ]
    return out, ref


def logits_of(backbone, ids):
    hidden, _ = backbone.call_with_state(ids)
    return ops.convert_to_numpy(backbone.token_embedding(hidden, reverse=True))


def test_logits_match_bert4keras3(export):
    path, ref = export
    assert is_bert4keras3_dir(path)
    backbone = convert_checkpoint(path, dtype="float32", progress=False)
    assert backbone.num_layers == 2
    assert backbone.hidden_dim == HIDDEN
    assert backbone.mix_lora_dim == D_MIX
    assert backbone.decay_lora_dim == D_DEC
    ids = np.load(ref / "ids.npy")
    expected = np.load(ref / "ids_logits.npy")
    assert relative_error(logits_of(backbone, ids), expected) <= TOL


def test_weights_are_blinkdl_state_dict(export):
    path, _ = export
    weights = load_bert4keras3_dir(path)
    assert weights["blocks.1.att.time_maa_w1"].shape == (HIDDEN, 5 * D_MIX)
    assert weights["blocks.1.att.time_maa_w2"].shape == (5, D_MIX, HIDDEN)
    assert weights["blocks.1.att.time_decay"].shape == (1, 1, HIDDEN)
    assert weights["blocks.0.ffn.key.weight"].shape == (FFN, HIDDEN)
    assert weights["head.weight"].shape == (VOCAB, HIDDEN)
    # Random init made it past bert4keras3: nothing left at 0 or 1.
    for key in ("att.time_decay", "att.time_maa_g", "att.ln_x.bias"):
        assert np.abs(weights[f"blocks.0.{key}"]).min() > 0
    assert np.ptp(weights["blocks.0.att.ln_x.weight"]) > 0.1


def test_token_zero_is_padding_in_bert4keras3(export):
    """bert4keras3 masks id 0 inside TimeMix (k = v = 0, decay 1) while its
    token shift and ChannelMix still see the token; BlinkDL (and
    keras_rwkv) treat id 0 as an ordinary token. Up to the first 0 the
    logits agree; from it on they differ."""
    path, ref = export
    backbone = convert_checkpoint(path, dtype="float32", progress=False)
    ids = np.load(ref / "ids_zero.npy")
    expected = np.load(ref / "ids_zero_logits.npy")
    got = logits_of(backbone, ids)
    assert relative_error(got[:, :9], expected[:, :9]) <= TOL
    assert relative_error(got[:, 9:], expected[:, 9:]) > 1e-2


def test_files_without_keras_names_load_the_same(export, tmp_path):
    """Older Keras 3 releases do not store layer names in the h5; the
    layers are then ordered by Keras's numeric suffixes."""
    path, _ = export
    copy = tmp_path / "old"
    shutil.copytree(path, copy)
    with h5py.File(copy / "model.weights.h5", "r+") as f:

        def strip(_, obj):
            if isinstance(obj, h5py.Group) and "name" in obj.attrs:
                del obj.attrs["name"]

        f.visititems(strip)
    new, old = load_bert4keras3_dir(path), load_bert4keras3_dir(copy)
    assert sorted(new) == sorted(old)
    for key in new:
        np.testing.assert_array_equal(new[key], old[key])


def test_bfloat16_export_keeps_its_dtype(export, tmp_path):
    path, ref = export
    copy = tmp_path / "bf16"
    shutil.copytree(path, copy)
    with h5py.File(copy / "model.weights.h5", "r+") as f:
        datasets = []
        f.visititems(
            lambda n, o: (
                datasets.append(n) if isinstance(o, h5py.Dataset) else None
            )
        )
        for name in datasets:  # as Keras saves bfloat16 variables
            data = np.asarray(f[name]).astype(ml_dtypes.bfloat16)
            del f[name]
            f.create_dataset(name, data=data).attrs["dtype"] = "bfloat16"
    weights = load_bert4keras3_dir(copy)
    assert weights["emb.weight"].dtype == ml_dtypes.bfloat16
    backbone = convert_checkpoint(copy, progress=False)
    assert backbone.dtype_policy.name == "bfloat16"
    emb = ops.convert_to_numpy(
        ops.cast(backbone.token_embedding.embeddings, "float32")
    )
    reference = load_bert4keras3_dir(path)["emb.weight"]
    np.testing.assert_array_equal(
        emb, reference.astype(ml_dtypes.bfloat16).astype("float32")
    )


def test_cli_converts_the_directory(export, tmp_path):
    path, ref = export
    out = tmp_path / "preset"
    assert cli_main(["convert", str(path), str(out)]) == 0
    loaded = RWKV6Backbone.from_preset(str(out))
    assert loaded.dtype_policy.name == "float32"  # the stored dtype
    ids = np.load(ref / "ids.npy")
    expected = np.load(ref / "ids_logits.npy")
    assert relative_error(logits_of(loaded, ids), expected) <= TOL
    # The written KerasHub preset is not mistaken for a bert4keras3 dir.
    assert not is_bert4keras3_dir(out)
    with pytest.raises(CheckpointError, match="is a directory"):
        convert_checkpoint(out, progress=False)


# Error cases (no bert4keras3 needed except where a valid h5 is used).


def write_dir(root, config=CONFIG, weights=None, vocab=True):
    root.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    if weights is not None:
        shutil.copy(weights, root / "model.weights.h5")
    if vocab:
        (root / "rwkv_vocab_v20230424.txt").write_text("1 '\\x00' 1\n")
    return root


@pytest.mark.parametrize(
    "config, weights, missing",
    [(CONFIG, False, "model.weights.h5"), (None, True, "config.json")],
)
def test_missing_files(tmp_path, config, weights, missing):
    h5 = tmp_path / "w.h5"
    with h5py.File(h5, "w"):
        pass
    root = write_dir(tmp_path / "d", config, h5 if weights else None)
    assert is_bert4keras3_dir(root)
    with pytest.raises(CheckpointError, match=f"missing {missing}"):
        convert_checkpoint(root, progress=False)


def test_empty_directory_keeps_the_generic_message(tmp_path):
    assert not is_bert4keras3_dir(tmp_path)
    with pytest.raises(CheckpointError, match="takes a BlinkDL `.pth`"):
        convert_checkpoint(tmp_path, progress=False)


@pytest.mark.parametrize(
    "config",
    [
        # A bert4keras3 Llama config: no `decomposer_size`.
        {k: v for k, v in CONFIG.items() if k != "decomposer_size"},
        {**CONFIG, "model_type": "rwkv7"},
        [1, 2, 3],
    ],
)
def test_config_that_is_not_rwkv6(tmp_path, config):
    h5 = tmp_path / "w.h5"
    with h5py.File(h5, "w"):
        pass
    root = write_dir(tmp_path / "d", config, h5)
    with pytest.raises(CheckpointError, match="not an RWKV6 config|flat JSON"):
        load_bert4keras3_dir(root)


def test_unreadable_config(tmp_path):
    root = write_dir(tmp_path / "d", None, None)
    (root / "config.json").write_text("{not json")
    (root / "model.weights.h5").write_bytes(b"")
    with pytest.raises(CheckpointError, match="Cannot read .* as JSON"):
        convert_checkpoint(root, progress=False)


def test_h5_without_rwkv_weights(tmp_path):
    import keras

    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    h5 = tmp_path / "other.weights.h5"
    other.save_weights(h5)
    root = write_dir(tmp_path / "d", CONFIG, h5)
    with pytest.raises(CheckpointError, match="lacks the weights"):
        convert_checkpoint(root, progress=False)


def test_damaged_h5(tmp_path):
    h5 = tmp_path / "junk.h5"
    h5.write_bytes(b"\x89HDF\r\n" + b"\x00" * 100)
    root = write_dir(tmp_path / "d", CONFIG, h5)
    with pytest.raises(CheckpointError, match="Cannot open .* as HDF5"):
        convert_checkpoint(root, progress=False)


def test_truncated_export(export, tmp_path):
    path, _ = export
    root = write_dir(tmp_path / "d", CONFIG, path / "model.weights.h5")
    with h5py.File(root / "model.weights.h5", "r+") as f:
        del f["layers/time_mix_1/dense_xg"]
    with pytest.raises(CheckpointError, match="lacks the weights"):
        load_bert4keras3_dir(root)


def test_config_must_match_weights(export, tmp_path):
    path, _ = export
    config = {**CONFIG, "hidden_size": 256, "num_hidden_layers": 3}
    root = write_dir(tmp_path / "d", config, path / "model.weights.h5")
    with pytest.raises(CheckpointError, match="hidden_size=256 .weights: 128."):
        load_bert4keras3_dir(root)


def test_named_seed_preset_from_a_fake_modelscope(
    export, tmp_path, monkeypatch
):
    # rwkv6_world_1.6b_bert4keras3 fetches exactly the three files of the
    # export, one by one, through the ModelScope SDK (faked here).
    from modelscope.hub import file_download

    from keras_rwkv.convert.preset_cache import MANIFEST

    out, ref = export
    source = MANIFEST["rwkv6_world_1.6b_bert4keras3"]["source"]
    calls = []

    def fake_download(
        model_id,
        file_path,
        revision=None,
        *,
        cache_dir=None,
        local_dir=None,
        **kwargs,
    ):
        calls.append((model_id, file_path))
        os.makedirs(local_dir, exist_ok=True)
        shutil.copy(out / file_path, os.path.join(local_dir, file_path))
        return os.path.join(local_dir, file_path)

    monkeypatch.setenv("KERAS_RWKV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(file_download, "model_file_download", fake_download)
    resolve_every_name(monkeypatch)
    backbone = RWKV6Backbone.from_preset("rwkv6_world_1.6b_bert4keras3")
    assert sorted(calls) == sorted(
        (source["modelscope_id"], f) for f in source["files"]
    )
    ids = np.load(ref / "ids.npy")
    expected = np.load(ref / "ids_logits.npy")
    assert relative_error(logits_of(backbone, ids), expected) <= 1e-4
