"""hf:// presets against a fake Hugging Face Hub (faked at the SDK
boundary: `huggingface_hub.hf_hub_download`, `model_info`, and for
uploads `create_repo`, `file_exists`, `upload_folder`), and named presets
fetched from Hugging Face."""

import json
import os
import shutil
import types

import huggingface_hub
import keras
import keras_hub
import numpy as np
import pytest
import torch
from huggingface_hub.utils import EntryNotFoundError
from keras import ops

from keras_rwkv import RWKV6Backbone
from keras_rwkv import RWKV6CausalLM
from keras_rwkv.convert import preset_cache
from keras_rwkv.convert.preset_cache import PresetDownloadError
from tests.fake_network import resolve_every_name
from tests.reference import random_rwkv6_state_dict
from tests.test_huggingface import fla_layout
from tests.test_huggingface import transformers_layout
from tests.test_huggingface import write_hf_dir

DIMS = dict(vocab=65536, layers=1, hidden=64, ffn=64, d_mix=4, d_dec=4)
REPO = "RWKV/v6-Finch-1B6-HF"

# Reading and caching files is the same on every backend (the forward pass
# is compared with BlinkDL's on each in test_blinkdl_parity.py).
pytestmark = pytest.mark.skipif(
    keras.config.backend() != "jax", reason="backend-independent; JAX pass"
)


class FakeHub:
    """Repositories as local directories; counts every call."""

    def __init__(self):
        self.repos = {}
        self.calls = []

    def hf_hub_download(self, repo_id, filename, *, local_dir=None, **kw):
        self.calls.append(("download", repo_id, filename))
        source = os.path.join(self.repos.get(repo_id, "/nonexistent"), filename)
        if not os.path.isfile(source):
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        if local_dir is None:  # Hugging Face's cache: the file itself
            return source
        target = os.path.join(local_dir, filename)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(source, target)
        return target

    def model_info(self, repo_id, files_metadata=False, **kw):
        self.calls.append(("info", repo_id))
        root = self.repos[repo_id]
        siblings = [
            types.SimpleNamespace(
                rfilename=name, size=os.path.getsize(os.path.join(root, name))
            )
            for name in sorted(os.listdir(root))
        ]
        return types.SimpleNamespace(siblings=siblings)

    def create_repo(self, repo_id, exist_ok=False, **kw):
        self.calls.append(("create", repo_id))
        return types.SimpleNamespace(repo_id=repo_id)

    def file_exists(self, repo_id, filename, **kw):
        root = self.repos.get(repo_id)
        return bool(root) and os.path.isfile(os.path.join(root, filename))

    def upload_folder(self, repo_id, folder_path, **kw):
        self.calls.append(("upload", repo_id, sorted(os.listdir(folder_path))))
        target = self.repos.setdefault(repo_id, folder_path + ".uploaded")
        shutil.copytree(folder_path, target, dirs_exist_ok=True)


@pytest.fixture(scope="module")
def state_dict():
    return random_rwkv6_state_dict(**DIMS, seed=9, dtype=torch.bfloat16)


@pytest.fixture
def hub(monkeypatch, tmp_path, state_dict):
    monkeypatch.setenv("KERAS_RWKV_CACHE", str(tmp_path / "cache"))
    fake = FakeHub()
    for name in (
        "hf_hub_download",
        "model_info",
        "create_repo",
        "file_exists",
        "upload_folder",
    ):
        monkeypatch.setattr(huggingface_hub, name, getattr(fake, name))
    monkeypatch.setattr(preset_cache, "_NOT_OURS", set())
    resolve_every_name(monkeypatch)
    config = {
        "model_type": "rwkv6",
        "hidden_size": 64,
        "num_hidden_layers": 1,
        "head_size": 64,
        "vocab_size": 65536,
        "tie_word_embeddings": False,
    }
    tf = write_hf_dir(
        tmp_path / "served" / "tf", transformers_layout(state_dict), config
    )
    # Files a full download would fetch needlessly.
    (tf / "README.md").write_text("model card")
    (tf / "pytorch_model.bin").write_bytes(b"the same weights, again")
    fake.repos[REPO] = str(tf)
    fla = write_hf_dir(
        tmp_path / "served" / "fla",
        fla_layout(state_dict, DIMS["layers"]),
        config,
        shards=2,
    )
    fake.repos["fla-hub/rwkv-6-world-tiny"] = str(fla)
    return fake


def logits(lm, ids=((3, 1, 4, 1, 5),)):
    out, _, _ = lm.call_with_state(np.array(ids))
    return ops.convert_to_numpy(ops.cast(out, "float32"))


def test_hf_handle_converts_once_then_loads_without_a_call(hub, tmp_path):
    lm = keras_hub.models.CausalLM.from_preset(f"hf://{REPO}")
    assert isinstance(lm, RWKV6CausalLM)
    downloaded = {c[2] for c in hub.calls if c[0] == "download"}
    # config.json and the weights, nothing else (no README, no .bin).
    assert downloaded == {"config.json", "model.safetensors"}
    assert lm.backbone.hidden_dim == 64
    cache = tmp_path / "cache"
    assert (cache / "hf" / "RWKV" / "v6-Finch-1B6-HF" / "config.json").exists()
    assert not (cache / "downloads").exists()
    assert lm.generate("Hi", max_new_tokens=2, stop_token_ids=None)

    hub.calls.clear()
    again = RWKV6CausalLM.from_preset(f"hf://{REPO}")
    RWKV6Backbone.from_preset(f"hf://{REPO}")
    assert hub.calls == []
    np.testing.assert_array_equal(logits(lm), logits(again))


def test_both_layouts_give_the_same_model(hub):
    a = RWKV6CausalLM.from_preset(f"hf://{REPO}")
    b = RWKV6CausalLM.from_preset("hf://fla-hub/rwkv-6-world-tiny")
    shards = {c[2] for c in hub.calls if c[0] == "download" and "fla" in c[1]}
    assert shards == {
        "config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    }
    np.testing.assert_array_equal(logits(a), logits(b))


def test_uploaded_keras_hub_preset_loads_through_keras_hub(hub, tmp_path):
    lm = RWKV6CausalLM.from_preset(f"hf://{REPO}")
    preset = tmp_path / "mine"
    lm.save_to_preset(str(preset))
    keras_hub.upload_preset("hf://someone/rwkv6-mine", str(preset))
    uploaded = [c for c in hub.calls if c[0] == "upload"][0]
    assert {"config.json", "model.weights.h5", "task.json"} <= set(uploaded[2])
    assert "README.md" in uploaded[2]  # KerasHub's generated card

    hub.calls.clear()
    again = keras_hub.models.CausalLM.from_preset("hf://someone/rwkv6-mine")
    assert isinstance(again, RWKV6CausalLM)
    # KerasHub's own loader read it (no conversion, nothing in our cache).
    assert ("download", "someone/rwkv6-mine", "model.weights.h5") in hub.calls
    assert not any(c[0] == "info" for c in hub.calls)
    assert not os.path.exists(preset_cache.hf_preset_dir("someone/rwkv6-mine"))
    np.testing.assert_array_equal(logits(lm), logits(again))


def test_a_repository_that_is_not_rwkv6_is_left_to_keras_hub(hub, tmp_path):
    other = tmp_path / "served" / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    hub.repos["someone/llama"] = str(other)
    with pytest.raises(Exception) as info:
        RWKV6CausalLM.from_preset("hf://someone/llama")
    assert not isinstance(info.value, PresetDownloadError)
    assert not os.path.exists(preset_cache.hf_preset_dir("someone/llama"))


def test_named_preset_from_hugging_face(hub, monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_RWKV_PRESET_HUB", "huggingface")
    name = "rwkv6_world_1.6b"
    assert preset_cache.MANIFEST[name]["huggingface"]["repo_id"] == REPO
    lm = RWKV6CausalLM.from_preset(name)
    assert (tmp_path / "cache" / name / "config.json").exists()
    assert {c[1] for c in hub.calls} == {REPO}
    hub.calls.clear()
    RWKV6CausalLM.from_preset(name)
    assert hub.calls == []
    assert lm.backbone.num_layers == 1


def test_named_preset_falls_back_to_hugging_face(hub, monkeypatch):
    import socket

    resolve = socket.getaddrinfo

    def modelscope_unreachable(host, *args, **kwargs):
        if "modelscope" in host:
            raise socket.gaierror(socket.EAI_NONAME, "Name not known")
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", modelscope_unreachable)
    RWKV6Backbone.from_preset("rwkv6_world_1.6b")
    assert ("info", REPO) in hub.calls


def test_hf_errors_say_what_to_do(hub, monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_RWKV_PRESET_HUB", "huggingface")
    with pytest.raises(ValueError, match="only on modelscope"):
        RWKV6Backbone.from_preset("rwkv6_world_1.6b_bert4keras3")
    monkeypatch.setenv("KERAS_RWKV_PRESET_HUB", "kaggle")
    with pytest.raises(ValueError, match="use one of modelscope, huggingface"):
        RWKV6Backbone.from_preset("rwkv6_world_3b")
    monkeypatch.delenv("KERAS_RWKV_PRESET_HUB")
    # A repository whose weights are missing.
    empty = tmp_path / "served" / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "rwkv6"}))
    hub.repos["someone/empty"] = str(empty)
    with pytest.raises(PresetDownloadError, match="no model.safetensors"):
        RWKV6Backbone.from_preset("hf://someone/empty")
    assert not (tmp_path / "cache" / "hf").exists()
    assert not (tmp_path / "cache" / "downloads").exists()


def test_a_handle_that_is_no_repository_id_never_becomes_a_path(hub, tmp_path):
    for handle in ("hf://../../escape", "hf://a/../../b", "hf://just-one"):
        with pytest.raises((ValueError, FileNotFoundError)):
            RWKV6Backbone.from_preset(handle)
    # Only KerasHub's own download attempts; nothing written anywhere.
    assert not any(c[0] == "info" for c in hub.calls)
    assert not (tmp_path / "cache").exists()
    assert not (tmp_path / "escape").exists()
