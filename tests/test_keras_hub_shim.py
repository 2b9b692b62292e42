"""The KerasHub shim: works on the installed KerasHub, refuses loudly on
one whose internals it does not know."""

import types

import keras_hub
import pytest
from packaging.specifiers import SpecifierSet

from keras_rwkv import keras_hub_shim


def test_installed_keras_hub_is_in_the_tested_range():
    # pyproject.toml pins the same range; CI installs from it.
    tested = SpecifierSet(keras_hub_shim.TESTED_KERAS_HUB)
    assert keras_hub.__version__ in tested
    assert keras_hub_shim._check(keras_hub_shim._preset_utils()) is None


def test_the_hook_is_installed_once_and_everywhere():
    from keras_hub.src.tokenizers import tokenizer
    from keras_hub.src.utils import preset_utils

    keras_hub_shim.install()  # again: idempotent
    assert preset_utils.get_file._keras_rwkv
    assert tokenizer.get_file is preset_utils.get_file
    assert "rwkv6_world_1.6b" in preset_utils.BUILTIN_PRESETS


def fake_preset_utils(**changes):
    def register_presets(presets, backbone_cls):
        pass

    def get_file(preset, path):
        pass

    names = dict(
        register_presets=register_presets,
        get_file=get_file,
        BUILTIN_PRESETS={},
    )
    names.update(changes)
    return types.SimpleNamespace(
        **{k: v for k, v in names.items() if v is not None}
    )


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"get_file": None}, "has no preset_utils.get_file"),
        ({"get_file": lambda handle, name: None}, "takes ('handle', 'name')"),
        ({"BUILTIN_PRESETS": []}, "BUILTIN_PRESETS is not a dict"),
    ],
)
def test_an_incompatible_keras_hub_fails_loudly(monkeypatch, changes, problem):
    fake = fake_preset_utils(**changes)
    assert problem in keras_hub_shim._check(fake)
    import keras_hub.src.utils as utils_package

    monkeypatch.setattr(utils_package, "preset_utils", fake)
    monkeypatch.setitem(
        __import__("sys").modules, "keras_hub.src.utils.preset_utils", fake
    )
    with pytest.raises(keras_hub_shim.KerasHubIncompatible) as info:
        keras_hub_shim._preset_utils()
    message = str(info.value)
    assert problem in message and keras_hub.__version__ in message
    assert "pip install 'keras-hub>=0.32,<0.33'" in message


def test_lora_layer_count_sees_keras_hubs_enable_lora():
    # Compiled programs keep the model's variable lists and notice LoRA
    # through this count: a KerasHub that records it elsewhere must fail
    # here, not leave programs blind to the LoRA weights.
    from keras_rwkv import RWKV6Backbone
    from keras_rwkv.keras_hub_shim import lora_layer_count

    backbone = RWKV6Backbone(
        vocabulary_size=50,
        num_layers=2,
        hidden_dim=64,
        intermediate_dim=128,
        mix_lora_dim=8,
        decay_lora_dim=8,
    )
    assert lora_layer_count(backbone) == 0
    backbone.enable_lora(rank=2, target_layer_names=["key"])
    # "key": the time mix's and the channel mix's, in each of 2 blocks.
    assert lora_layer_count(backbone) == 4
