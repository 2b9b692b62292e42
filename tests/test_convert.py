"""Checkpoint reading and conversion: safety, errors, CLI."""

import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from keras import ops

from keras_rwkv import RWKV6Backbone
from keras_rwkv import RWKV6Tokenizer
from keras_rwkv.cli import main as cli_main
from keras_rwkv.convert import CheckpointError
from keras_rwkv.convert import UnsafeCheckpointError
from keras_rwkv.convert import convert_checkpoint
from keras_rwkv.convert import detect_rwkv_version
from keras_rwkv.convert import load_torch_checkpoint
from keras_rwkv.convert import write_preset
from tests.reference import LORA7B
from tests.reference import random_rwkv6_state_dict
from tests.reference import save_checkpoint

TINY = dict(vocab=50, layers=2, hidden=128, ffn=256, d_mix=8, d_dec=16)


@pytest.fixture(scope="module")
def tiny_sd():
    return random_rwkv6_state_dict(**TINY, seed=3)


def write(tmp_path, sd, name="model.pth"):
    return save_checkpoint(tmp_path / name, sd)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64]
)
def test_reader_matches_torch_load(tmp_path, dtype):
    sd = {
        "a": torch.randn(3, 4).to(dtype),
        "b": torch.randn(5, 6).to(dtype).t(),  # non-contiguous view
        "c": torch.arange(10),
        "d": torch.randn(2, 8).to(dtype)[:, 3:5],  # storage offset
        "e": torch.tensor(1.5).to(dtype),  # scalar
    }
    path = write(tmp_path, sd)
    ours = load_torch_checkpoint(path)
    assert set(ours) == set(sd)
    for key, ref in sd.items():
        ref = ref.float().numpy() if ref.is_floating_point() else ref.numpy()
        got = np.asarray(ours[key]).astype(ref.dtype)
        np.testing.assert_array_equal(got, ref)


def test_reader_handles_parameters(tmp_path):
    sd = {"p": torch.nn.Parameter(torch.randn(4, 4))}
    ours = load_torch_checkpoint(write(tmp_path, sd))
    np.testing.assert_array_equal(ours["p"], sd["p"].detach().numpy())


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/keras_rwkv_pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"x": _RunsCode()}))
    if os.path.exists("/tmp/keras_rwkv_pwned"):
        os.remove("/tmp/keras_rwkv_pwned")
    with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system"):
        load_torch_checkpoint(path)
    assert not os.path.exists("/tmp/keras_rwkv_pwned")


def test_torch_save_of_an_object_is_refused(tmp_path):
    path = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(UnsafeCheckpointError, match="Refusing"):
        load_torch_checkpoint(path)


def test_truncated_file(tmp_path, tiny_sd):
    path = write(tmp_path, tiny_sd)
    data = open(path, "rb").read()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        convert_checkpoint(cut, progress=False)


def test_legacy_and_garbage_files(tmp_path):
    legacy = tmp_path / "legacy.pth"
    torch.save(
        {"a": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False
    )
    with pytest.raises(CheckpointError, match="legacy"):
        load_torch_checkpoint(legacy)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"hello world" * 10)
    with pytest.raises(CheckpointError, match="not a readable"):
        load_torch_checkpoint(junk)
    with pytest.raises(CheckpointError, match="No such"):
        load_torch_checkpoint(tmp_path / "missing.pth")


def test_damaged_storage(tmp_path):
    path = write(tmp_path, {"a": torch.ones(100)})
    damaged = tmp_path / "damaged.pth"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(damaged, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if "/data/" in info.filename:
                data = data[:10]
            dst.writestr(info, data)
    with pytest.raises(CheckpointError, match="damaged"):
        load_torch_checkpoint(damaged)


def test_missing_keys(tmp_path, tiny_sd):
    sd = dict(tiny_sd)
    del sd["blocks.1.att.gate.weight"]
    del sd["ln_out.bias"]
    with pytest.raises(CheckpointError, match="missing keys: .*gate"):
        convert_checkpoint(write(tmp_path, sd), progress=False)


def test_unexpected_shapes(tmp_path, tiny_sd):
    sd = dict(tiny_sd)
    sd["blocks.1.ffn.value.weight"] = torch.zeros(128, 100)
    with pytest.raises(CheckpointError, match="unexpected shapes: .*ffn"):
        convert_checkpoint(write(tmp_path, sd), progress=False)


@pytest.mark.parametrize(
    "keys, version",
    [
        (["blocks.0.att.time_first", "blocks.0.att.time_mix_k"], "4"),
        (["blocks.0.att.ln_x.weight", "blocks.0.att.time_faaaa"], "5"),
        (["blocks.0.att.w0", "blocks.0.att.r_k", "blocks.0.att.a0"], "7"),
        (["encoder.weight"], None),
    ],
)
def test_other_versions_are_named(tmp_path, keys, version):
    assert detect_rwkv_version(keys) == version
    sd = {"emb.weight": torch.zeros(4, 4), **{k: torch.zeros(2) for k in keys}}
    expected = f"RWKV-{version} checkpoint" if version else "not an RWKV"
    with pytest.raises(CheckpointError, match=expected):
        convert_checkpoint(write(tmp_path, sd), progress=False)


def test_dims_are_inferred(tmp_path):
    sd = random_rwkv6_state_dict(**LORA7B, seed=1)
    backbone = convert_checkpoint(write(tmp_path, sd), progress=False)
    assert (backbone.vocabulary_size, backbone.num_layers) == (250, 2)
    assert (backbone.hidden_dim, backbone.intermediate_dim) == (128, 448)
    assert (backbone.mix_lora_dim, backbone.decay_lora_dim) == (64, 128)


def test_dtype_defaults_to_the_checkpoint(tmp_path, tiny_sd):
    bf16 = {k: v.to(torch.bfloat16) for k, v in tiny_sd.items()}
    backbone = convert_checkpoint(write(tmp_path, bf16), progress=False)
    assert backbone.dtype_policy.name == "bfloat16"
    emb = ops.convert_to_numpy(
        ops.cast(backbone.token_embedding.embeddings, "float32")
    )
    np.testing.assert_array_equal(emb, bf16["emb.weight"].float().numpy())


def test_cli_convert_writes_a_loadable_preset(tmp_path, tiny_sd):
    src = write(tmp_path, tiny_sd)
    out = tmp_path / "preset"
    assert cli_main(["convert", src, str(out), "--dtype", "float32"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["registered_name"] == "keras_rwkv>RWKV6Backbone"
    loaded = RWKV6Backbone.from_preset(str(out))
    tokenizer = RWKV6Tokenizer.from_preset(str(out))
    assert tokenizer.detokenize(tokenizer("Hello 你好")) == "Hello 你好"
    direct = convert_checkpoint(src, dtype="float32", progress=False)
    ids = np.array([[3, 4, 5, 6]])
    a, _ = loaded.call_with_state(ids)
    b, _ = direct.call_with_state(ids)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(a), ops.convert_to_numpy(b)
    )
    # No stray temp dirs next to the output.
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # A second run refuses to clobber without --overwrite.
    assert cli_main(["convert", src, str(out)]) == 2
    assert cli_main(["convert", src, str(out), "--overwrite"]) == 0


def test_cli_reports_errors(tmp_path, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00" * 64)
    assert cli_main(["convert", str(junk), str(tmp_path / "o")]) == 2
    assert "not a readable PyTorch checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_failed_write_leaves_nothing(tmp_path):
    class Broken:
        def save_to_preset(self, path):
            open(os.path.join(path, "config.json"), "w").write("{}")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_preset(Broken(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_pickled_non_dict_is_rejected(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.ones(2)], path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        convert_checkpoint(path, progress=False)


def test_reader_does_not_need_torch_pickle_module():
    # The restricted unpickler refuses anything beyond tensor rebuilding,
    # even harmless-looking globals.
    buf = io.BytesIO()
    pickle.dump({"x": complex(1, 2)}, buf, protocol=2)
    with pytest.raises(UnsafeCheckpointError):
        from keras_rwkv.convert.torch_checkpoint import _RestrictedUnpickler

        buf.seek(0)
        _RestrictedUnpickler(buf, type("R", (), {"path": "mem"})()).load()


def test_unknown_dtype_is_refused_before_reading(tmp_path, capsys):
    out = tmp_path / "o"
    assert cli_main(["convert", "any.pth", str(out), "--dtype", "bogus"]) == 2
    assert "not a Keras dtype policy" in capsys.readouterr().err
    assert not out.exists()
