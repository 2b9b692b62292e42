"""Named presets from a fake ModelScope (faked at the SDK boundary:
`modelscope.hub.file_download.model_file_download`), the cache, errors,
and KerasHub's own loaders for local and modelscope:// presets."""

import importlib
import os
import shutil

import keras_hub
import numpy as np
import pytest
import torch
from keras import ops
from modelscope.hub import file_download

import keras_rwkv
from keras_rwkv import RWKV6Backbone
from keras_rwkv import RWKV6CausalLM
from keras_rwkv import RWKV6Tokenizer
from keras_rwkv.convert import CheckpointError
from keras_rwkv.convert import preset_cache
from keras_rwkv.convert.preset_cache import MANIFEST
from keras_rwkv.convert.preset_cache import PresetDownloadError
from tests.fake_network import resolve_every_name
from tests.reference import random_rwkv6_state_dict

NAME = "rwkv6_world_1.6b"
FILE = MANIFEST[NAME]["source"]["file"]


@pytest.fixture(scope="module")
def tiny_pth(tmp_path_factory):
    # A World-vocabulary model small enough for CI, bf16 like the real one.
    sd = random_rwkv6_state_dict(
        vocab=65536,
        layers=1,
        hidden=64,
        ffn=64,
        d_mix=4,
        d_dec=4,
        seed=5,
        dtype=torch.bfloat16,
    )
    path = tmp_path_factory.mktemp("served") / FILE
    torch.save(sd, path)
    return path


class FakeModelScope:
    """Serves files like `model_file_download` does; counts calls."""

    def __init__(self, files):
        self.files = dict(files)  # (model_id, name) -> bytes or Exception
        self.calls = []

    def __call__(
        self,
        model_id,
        file_path,
        revision=None,
        *,
        cache_dir=None,
        local_dir=None,
        **kwargs,
    ):
        self.calls.append((model_id, file_path))
        served = self.files.get((model_id, file_path))
        if served is None:
            raise FileNotFoundError(f"{model_id} has no file {file_path}")
        if isinstance(served, Exception):
            raise served
        os.makedirs(local_dir, exist_ok=True)
        path = os.path.join(local_dir, file_path)
        with open(path, "wb") as f:
            f.write(served)
        return path


@pytest.fixture
def fake_hub(monkeypatch, tmp_path, tiny_pth):
    monkeypatch.setenv("KERAS_RWKV_CACHE", str(tmp_path / "cache"))
    fake = FakeModelScope(
        {("Blink_DL/rwkv-6-world", FILE): tiny_pth.read_bytes()}
    )
    monkeypatch.setattr(file_download, "model_file_download", fake)
    resolve_every_name(monkeypatch)
    return fake


def test_named_preset_loads_end_to_end_then_from_cache(fake_hub, tmp_path):
    lm = keras_hub.models.CausalLM.from_preset(NAME)
    assert isinstance(lm, RWKV6CausalLM)
    # Only the one file of the repository was fetched.
    assert fake_hub.calls == [("Blink_DL/rwkv-6-world", FILE)]
    assert lm.backbone.hidden_dim == 64
    # KerasHub loads at the default float dtype unless told otherwise.
    assert lm.backbone.dtype_policy.name == "float32"
    text = lm.generate("Hello", max_new_tokens=3, stop_token_ids=None)
    assert text.startswith("Hello")
    cache = tmp_path / "cache"
    assert (cache / NAME / "config.json").exists()
    assert not (cache / "downloads" / NAME).exists()  # download dropped

    # Second load: from the cache, no network.
    half = RWKV6CausalLM.from_preset(NAME, dtype="bfloat16")
    assert half.backbone.dtype_policy.name == "bfloat16"
    again = RWKV6CausalLM.from_preset(NAME)
    RWKV6Backbone.from_preset(NAME)
    RWKV6Tokenizer.from_preset(NAME)
    assert len(fake_hub.calls) == 1
    ids = np.array([[5, 6, 7]])
    a, _, _ = lm.call_with_state(ids)
    b, _, _ = again.call_with_state(ids)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(a), ops.convert_to_numpy(b)
    )


def test_presets_are_listed():
    for cls in (RWKV6CausalLM, RWKV6Backbone, keras_hub.models.CausalLM):
        names = set(cls.presets)
        assert {
            "rwkv6_world_1.6b",
            "rwkv6_world_3b",
            "rwkv6_world_7b",
            "rwkv6_world_14b",
        } <= names


def test_unknown_name_lists_the_available_ones(fake_hub):
    with pytest.raises(ValueError, match="Available presets: .*1.6b"):
        RWKV6CausalLM.from_preset("rwkv6_world_2b")
    assert fake_hub.calls == []


def test_download_failure_says_how_to_load_locally(fake_hub, tmp_path):
    fake_hub.files[("Blink_DL/rwkv-6-world", FILE)] = ConnectionError("boom")
    with pytest.raises(PresetDownloadError, match="keras-rwkv convert"):
        RWKV6CausalLM.from_preset(NAME)
    assert not preset_cache.is_cached(NAME)
    # Nothing left behind: the cache root did not exist before.
    assert not (tmp_path / "cache").exists()


def test_too_little_disk_space_fails_before_downloading(
    fake_hub, tmp_path, monkeypatch
):
    free = preset_cache.MANIFEST[NAME]["params"]  # half of the download
    usage = shutil.disk_usage(tmp_path)._replace(free=free)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    with pytest.raises(PresetDownloadError, match="Not enough disk space"):
        RWKV6CausalLM.from_preset(NAME)
    assert fake_hub.calls == []
    assert not (tmp_path / "cache").exists()


def test_truncated_download_leaves_no_cache_entry(fake_hub, tiny_pth, tmp_path):
    good = tiny_pth.read_bytes()
    fake_hub.files[("Blink_DL/rwkv-6-world", FILE)] = good[: len(good) // 3]
    with pytest.raises(CheckpointError, match="truncated"):
        RWKV6CausalLM.from_preset(NAME)
    assert not (tmp_path / "cache").exists()  # no entry, lock or dir
    # The next attempt downloads again and succeeds.
    fake_hub.files[("Blink_DL/rwkv-6-world", FILE)] = good
    RWKV6Backbone.from_preset(NAME)
    assert len(fake_hub.calls) == 2


def test_local_directory_and_save_to_preset_round_trip(fake_hub, tmp_path):
    lm = RWKV6CausalLM.from_preset(NAME)
    lm.save_to_preset(str(tmp_path / "mine"))
    loaded = keras_hub.models.CausalLM.from_preset(str(tmp_path / "mine"))
    ids = np.array([[9, 8, 7, 6]])
    a, _, _ = lm.call_with_state(ids)
    b, _, _ = loaded.call_with_state(ids)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(a), ops.convert_to_numpy(b)
    )


def test_modelscope_handle_goes_through_keras_hub(
    fake_hub, tmp_path, monkeypatch
):
    RWKV6CausalLM.from_preset(NAME).save_to_preset(str(tmp_path / "repo"))
    requested = []

    def fake_snapshot(model_id, *args, **kwargs):
        requested.append(model_id)
        return str(tmp_path / "repo")

    module = importlib.import_module("modelscope.hub.snapshot_download")
    monkeypatch.setattr(module, "snapshot_download", fake_snapshot)
    lm = keras_hub.models.CausalLM.from_preset("modelscope://someone/rwkv6")
    assert isinstance(lm, RWKV6CausalLM)
    assert requested and requested[0] == "someone/rwkv6"


def expected_params(c):
    layers, h, f = c["num_layers"], c["hidden_dim"], c["intermediate_dim"]
    dm, dd, v = c["mix_lora_dim"], c["decay_lora_dim"], c["vocabulary_size"]
    att = 5 * h * h + 6 * h + 10 * h * dm + 2 * h * dd + 2 * h + 2 * h
    ffn = 2 * f * h + h * h + 2 * h
    return layers * (att + ffn + 4 * h) + 2 * v * h + 4 * h


def test_manifest_is_consistent():
    small = dict(
        vocabulary_size=300,
        num_layers=2,
        hidden_dim=128,
        intermediate_dim=448,
        head_size=64,
        mix_lora_dim=8,
        decay_lora_dim=16,
    )
    assert RWKV6Backbone(**small).count_params() == expected_params(small)
    sizes = {
        "rwkv6_world_1.6b": 1.6e9,
        "rwkv6_world_3b": 3.1e9,
        "rwkv6_world_7b": 7.6e9,
        "rwkv6_world_14b": 14.1e9,
    }
    for name, approx in sizes.items():
        entry = MANIFEST[name]
        assert entry["params"] == expected_params(entry["config"])
        assert abs(entry["params"] - approx) / approx < 0.02
        assert entry["source"]["modelscope_id"] == "Blink_DL/rwkv-6-world"
        assert entry["source"]["file"].startswith("RWKV-x060-World-")
        assert "v2.1" in entry["source"]["file"]
    assert (
        keras_rwkv.RWKV6CausalLM.presets[NAME]["metadata"]["params"]
        == (MANIFEST[NAME]["params"])
    )


def test_an_incomplete_cache_entry_is_rebuilt(fake_hub, tmp_path):
    # Left by a crash before the preset was complete: no config.json.
    entry = tmp_path / "cache" / NAME
    entry.mkdir(parents=True)
    (entry / "model.weights.h5").write_bytes(b"half")
    backbone = RWKV6Backbone.from_preset(NAME)
    assert backbone.hidden_dim == 64
    assert (entry / "config.json").exists()
    assert len(fake_hub.calls) == 1
