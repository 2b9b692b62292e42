"""Damaged or non-finite files are refused with the path and what to do:
.pth storages fail their zip CRC, NaN weights in a checkpoint or a preset,
unreadable preset weights, damaged or NaN state files."""

import shutil
import zipfile

import h5py
import numpy as np
import pytest

from keras_rwkv import RWKV6Backbone
from keras_rwkv import RWKV6State
from keras_rwkv.cli import main as cli_main
from keras_rwkv.convert import CheckpointError
from keras_rwkv.convert import convert_checkpoint
from keras_rwkv.models.rwkv6.rwkv6_weight_checks import PresetLoadError
from tests.reference import TINY_WORLD
from tests.reference import random_rwkv6_state_dict
from tests.reference import save_checkpoint
from tests.reference import save_tiny_world_preset

DIMS = dict(vocab=300, layers=1, hidden=128, ffn=256, d_mix=8, d_dec=16)


@pytest.fixture(scope="module")
def pth(tmp_path_factory):
    path = tmp_path_factory.mktemp("integrity") / "m.pth"
    return save_checkpoint(path, random_rwkv6_state_dict(**DIMS, seed=3))


def flip_a_byte_inside(path, member_suffix, out):
    """A copy of the .pth with one byte of a stored member flipped."""
    shutil.copy(path, out)
    with zipfile.ZipFile(out) as zf:
        info = next(
            i for i in zf.infolist() if i.filename.endswith(member_suffix)
        )
    with open(out, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), "<u2")
        position = info.header_offset + 30 + name_len + extra_len + 5
        f.seek(position)
        byte = f.read(1)
        f.seek(position)
        f.write(bytes([byte[0] ^ 0x40]))
    return out


def test_a_flipped_byte_fails_the_crc(pth, tmp_path):
    # Member "data/0" is the first storage torch.save wrote.
    bad = flip_a_byte_inside(pth, "data/0", tmp_path / "flipped.pth")
    with pytest.raises(CheckpointError, match="fails the zip's integrity"):
        convert_checkpoint(bad, progress=False)
    convert_checkpoint(pth, progress=False)  # the original is fine


def test_nan_weights_are_refused_unless_allowed(tmp_path, capsys):
    sd = random_rwkv6_state_dict(**DIMS, seed=4)
    sd["blocks.0.att.key.weight"][3, 5] = float("nan")
    sd["blocks.0.att.time_faaaa"][0, 0] = float("inf")
    path = save_checkpoint(tmp_path / "nan.pth", sd)
    with pytest.raises(CheckpointError, match="att.key.weight") as e:
        convert_checkpoint(path, progress=False)
    assert "time_faaaa" in str(e.value)
    assert cli_main(["convert", str(path), str(tmp_path / "o")]) == 2
    assert "--allow-non-finite" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    backbone = convert_checkpoint(path, progress=False, allow_non_finite=True)
    assert isinstance(backbone, RWKV6Backbone)


@pytest.fixture
def preset(tmp_path):
    path = tmp_path / "preset"
    save_tiny_world_preset(path)
    return path


def test_nan_in_preset_weights_names_the_variable(preset, monkeypatch):
    with h5py.File(preset / "model.weights.h5", "r+") as f:
        names = []
        f.visititems(
            lambda n, o: (
                names.append(n) if isinstance(o, h5py.Dataset) else None
            )
        )
        target = next(n for n in names if "ln_out" in n or "layer_norm" in n)
        data = f[target][...]
        data.flat[0] = np.nan
        f[target][...] = data
    with pytest.raises(PresetLoadError, match="NaN or infinite") as e:
        RWKV6Backbone.from_preset(str(preset))
    assert f"Delete {preset}" in str(e.value)
    monkeypatch.setenv("KERAS_RWKV_ALLOW_NON_FINITE", "1")
    RWKV6Backbone.from_preset(str(preset))


def test_truncated_preset_weights_say_what_to_do(preset, capsys):
    weights = preset / "model.weights.h5"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(PresetLoadError, match="cannot be read") as e:
        RWKV6Backbone.from_preset(str(preset))
    assert str(weights) in str(e.value) and f"Delete {preset}" in str(e.value)
    args = ["generate", "--preset", str(preset), "--max-new-tokens", "1", "x"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2


def good_state(tmp_path):
    backbone = RWKV6Backbone(
        vocabulary_size=50,
        num_layers=1,
        hidden_dim=64,
        intermediate_dim=64,
        head_size=32,
        mix_lora_dim=4,
        decay_lora_dim=4,
    )
    return RWKV6State.zeros(backbone, 1).save(tmp_path / "s.npz")


@pytest.mark.parametrize("damage", ["empty", "truncated", "crc", "keys", "nan"])
def test_damaged_state_files_name_the_path(tmp_path, damage):
    path = good_state(tmp_path)
    data = open(path, "rb").read()
    if damage == "empty":
        open(path, "wb").close()
    elif damage == "truncated":
        open(path, "wb").write(data[: len(data) // 2])
    elif damage == "crc":
        raw = bytearray(data)
        raw[200] ^= 0x01  # inside the first member's data
        open(path, "wb").write(bytes(raw))
    elif damage == "keys":
        np.savez(path, format=np.array("keras_rwkv.RWKV6State"))
    else:
        with np.load(path) as f:
            arrays = dict(f)
        arrays["wkv"] = arrays["wkv"].copy()
        arrays["wkv"].flat[0] = np.nan
        np.savez(path, **arrays)
    with pytest.raises(ValueError, match=str(tmp_path)):
        RWKV6State.load(path)


def test_nan_tuned_states_are_refused():
    backbone = RWKV6Backbone(**TINY_WORLD)
    backbone.enable_state_tuning()
    arrays = backbone.tuned_state_arrays()
    arrays["wkv"].flat[7] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        backbone.set_tuned_state_arrays(arrays["wkv"], arrays["shift"])


def test_garbage_config_names_the_file(preset):
    (preset / "config.json").write_text("{not json")
    with pytest.raises(PresetLoadError, match="config.json cannot be read"):
        RWKV6Backbone.from_preset(str(preset))
