"""`quantize` on RWKV6 the Keras way: which layers, how close, round trip."""

import gc
import warnings

import keras_hub
import numpy as np
import pytest
from keras import ops

from keras_rwkv.models.rwkv6.rwkv6_projection import step_rows
from tests.reference import save_tiny_world_preset

# Largest logit error of the quantized model, as a fraction of the float
# model's largest logit (random tiny World model, weights N(0, 0.05)).
TOLERANCE = {"int8": 0.05, "int4": 0.1, "float8": 0.05}


@pytest.fixture(autouse=True)
def no_full_collections(monkeypatch):
    # Keras runs a full `gc.collect()` after each variable `quantize`
    # deletes (to free device memory at once): ~0.35 s each in a test
    # process, most of these tests' time, and nothing they check.
    monkeypatch.setattr(gc, "collect", lambda generation=2: 0)


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    path = tmp_path_factory.mktemp("float")
    save_tiny_world_preset(path, spread=0.05, seed=3)
    return str(path)


@pytest.fixture(scope="module")
def float_logits(preset):
    return logits(keras_hub.models.CausalLM.from_preset(preset), inputs())


def inputs(seed=0):
    ids = np.random.default_rng(seed).integers(1, 65000, (2, 9))
    ids = ids.astype("int32")
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    return {"token_ids": ids, "padding_mask": mask}


def logits(lm, x):
    return ops.convert_to_numpy(lm(x)).astype("float64")


def quantized_paths(model):
    return {
        layer.path
        for layer in model._flatten_layers()
        if layer.quantization_mode is not None
    }


@pytest.mark.parametrize("mode", ["int8", "int4", "float8"])
def test_quantized_causal_lm_is_close_and_round_trips(
    preset, float_logits, mode, tmp_path
):
    lm = keras_hub.models.CausalLM.from_preset(preset)
    x = inputs()
    reference = float_logits
    float_weights = {
        v.path: ops.convert_to_numpy(v)
        for v in lm.weights
        if "time_decay" in v.path or "ln" in v.path or "time_faaaa" in v.path
    }
    # With the tokenizer attached (it used to raise), and without warnings
    # about layers Keras cannot quantize (they are never offered to it).
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        lm.quantize(mode)

    paths = quantized_paths(lm.backbone)
    projections = {
        f"block_{i}/{mix}/{name}"
        for i in range(2)
        for mix, names in (
            ("time_mix", ("receptance", "key", "value", "gate", "output")),
            ("channel_mix", ("key", "receptance", "value")),
        )
        for name in names
    }
    head = {"token_embedding"} if mode == "int8" else set()
    assert paths == projections | head
    # The WKV math's weights, the decay and the norms are left as they were.
    for v in lm.weights:
        if v.path in float_weights:
            np.testing.assert_array_equal(
                ops.convert_to_numpy(v), float_weights[v.path]
            )

    got = logits(lm, x)
    error = np.abs(got - reference).max() / np.abs(reference).max()
    assert 0 < error <= TOLERANCE[mode]

    lm.save_to_preset(str(tmp_path))
    again = keras_hub.models.CausalLM.from_preset(str(tmp_path))
    assert quantized_paths(again.backbone) == paths
    np.testing.assert_array_equal(logits(again, x), got)


def test_quantized_generate_is_the_step_by_step_greedy(preset):
    lm = keras_hub.models.CausalLM.from_preset(preset)
    lm.compile(sampler="greedy")
    prompt = {"token_ids": np.array([[11, 250, 3000, 7]])}
    prompt["padding_mask"] = np.ones_like(prompt["token_ids"])
    lm._compiled(("float program",), lambda: None)
    lm.quantize("int8")
    assert lm._compiled_functions == {}  # float programs are dropped

    out = lm.generate(prompt, max_new_tokens=4, stop_token_ids=None)
    tokens = prompt["token_ids"][0].tolist()
    step_logits, _, state = lm.call_with_state(prompt["token_ids"])
    for _ in range(4):
        token = int(np.argmax(ops.convert_to_numpy(step_logits)[0, -1]))
        tokens.append(token)
        step_logits, _, state = lm.call_with_state(
            np.array([[token]]), None, state
        )
    kept = np.asarray(out["padding_mask"])[0].astype(bool)
    assert np.asarray(out["token_ids"])[0][kept].tolist() == tokens


def test_bad_quantize_mode_and_step_rows(preset, monkeypatch):
    lm = keras_hub.models.CausalLM.from_preset(preset)
    with pytest.raises(ValueError, match="int3"):
        lm.quantize("int3")
    monkeypatch.setenv("KERAS_RWKV_STEP_ROWS", "two")
    with pytest.raises(ValueError, match="KERAS_RWKV_STEP_ROWS"):
        step_rows()
    monkeypatch.setenv("KERAS_RWKV_STEP_ROWS", "1")
    assert step_rows() == 1


def test_weight_only_int8_config_round_trips(preset, float_logits, tmp_path):
    """Keras's weight-only int8 (`activation_quantizer=None`, the form the
    decoding-step kernel reads as W8A16): the embedding gets a per-row
    quantizer of its own (the config's is per column). Keras 3.15 does not
    save a layer's config; the backbone's says `int8_weight_only`, so the
    preset reloads weight-only, with the logits it gave before saving."""
    from keras.quantizers import AbsMaxQuantizer
    from keras.quantizers import Int8QuantizationConfig

    lm = keras_hub.models.CausalLM.from_preset(preset)
    config = Int8QuantizationConfig(
        weight_quantizer=AbsMaxQuantizer(axis=0), activation_quantizer=None
    )
    lm.quantize("int8", config=config)
    assert "token_embedding" in {p.split("/")[-1] for p in quantized_paths(lm)}
    dense = lm.backbone.get_layer("block_0").time_mix.key
    assert dense.quantization_mode == "int8" and dense.inputs_quantizer is None
    x = inputs()
    got = logits(lm, x)
    error = np.abs(got - float_logits).max() / np.abs(float_logits).max()
    assert 0 < error < TOLERANCE["int8"]
    lm.save_to_preset(str(tmp_path / "q"))
    again = keras_hub.models.CausalLM.from_preset(str(tmp_path / "q"))
    reloaded = logits(again, x)
    error = np.abs(reloaded - float_logits).max() / np.abs(float_logits).max()
    assert error < TOLERANCE["int8"]
    dense = again.backbone.get_layer("block_0").time_mix.key
    assert dense.quantization_mode == "int8" and dense.inputs_quantizer is None
    np.testing.assert_array_equal(reloaded, got)


def test_quantized_backbone_preset_loads_on_its_own(preset, tmp_path):
    """KerasHub's `Backbone.from_preset` drops a saved policy map; the
    backbone's own config brings its quantized layers back."""
    backbone = keras_hub.models.Backbone.from_preset(preset)
    backbone.quantize("int8")
    x = inputs()
    before = ops.convert_to_numpy(backbone(x))
    backbone.save_to_preset(str(tmp_path / "b"))
    again = keras_hub.models.Backbone.from_preset(str(tmp_path / "b"))
    assert quantized_paths(again) == quantized_paths(backbone)
    np.testing.assert_array_equal(ops.convert_to_numpy(again(x)), before)
    # A float dtype the caller asks for becomes the quantized layers' own.
    half = keras_hub.models.Backbone.from_preset(
        str(tmp_path / "b"), dtype="bfloat16"
    )
    key = half.get_layer("block_0").time_mix.key
    assert key.quantization_mode == "int8"
    assert key.compute_dtype == "bfloat16"
