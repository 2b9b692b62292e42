"""RWKV6Backbone: config, dtypes, state carrying and padding."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_rwkv import RWKV6Backbone
from keras_rwkv import RWKV6State
from tests.reference import relative_error

TINY = dict(
    vocabulary_size=97,
    num_layers=2,
    hidden_dim=128,
    intermediate_dim=256,
    mix_lora_dim=8,
    decay_lora_dim=16,
)
TOL = 1e-5  # fp32, same computation split differently


def tiny_backbone(**kwargs):
    keras.utils.set_random_seed(0)
    return RWKV6Backbone(**{**TINY, **kwargs})


def logits(backbone, hidden):
    return ops.convert_to_numpy(
        ops.cast(backbone.token_embedding(hidden, reverse=True), "float32")
    )


def tokens(n, seed=0, batch=1):
    return np.random.default_rng(seed).integers(1, 97, size=(batch, n))


def test_functional_call_matches_call_with_state():
    backbone = tiny_backbone()
    ids = tokens(11)
    out = backbone({"token_ids": ids, "padding_mask": np.ones_like(ids)})
    hidden, state = backbone.call_with_state(ids)
    assert out.shape == (1, 11, 128)
    assert (
        relative_error(ops.convert_to_numpy(out), ops.convert_to_numpy(hidden))
        <= TOL
    )
    assert tuple(state.wkv.shape) == (1, 2, 2, 64, 64)
    assert tuple(state.shift.shape) == (1, 2, 2, 128)


def test_config_round_trip():
    # Default runtime knobs: `wkv_chunk_size` is not saved (see
    # test_runtime_knobs_stay_out_of_the_saved_config), and another chunk
    # length rounds differently.
    backbone = tiny_backbone()
    clone = RWKV6Backbone.from_config(backbone.get_config())
    assert clone.get_config() == backbone.get_config()
    assert clone.count_params() == backbone.count_params()
    clone.set_weights(backbone.get_weights())
    ids = tokens(9)
    a, _ = backbone.call_with_state(ids)
    b, _ = clone.call_with_state(ids)
    np.testing.assert_allclose(
        ops.convert_to_numpy(a), ops.convert_to_numpy(b), atol=1e-6
    )


def test_two_pieces_equal_whole():
    backbone = tiny_backbone()
    ids = tokens(37, seed=1, batch=2)
    whole, whole_state = backbone.call_with_state(ids)
    _, state = backbone.call_with_state(ids[:, :20])
    part, state = backbone.call_with_state(ids[:, 20:], state=state)
    assert (
        relative_error(logits(backbone, part), logits(backbone, whole)[:, 20:])
        <= TOL
    )
    for a, b in zip(state, whole_state):
        assert (
            relative_error(ops.convert_to_numpy(a), ops.convert_to_numpy(b))
            <= TOL
        )


def test_state_as_per_layer_list_is_the_same_state():
    # The form the decoding loop carries (`RWKV6State.layers()`).
    backbone = tiny_backbone()
    ids = tokens(6, seed=4, batch=2)
    _, state = backbone.call_with_state(ids[:, :4])
    hidden, whole = backbone.call_with_state(ids[:, 4:], state=state)
    hidden_l, layers = backbone.call_with_state(
        ids[:, 4:], state=state.layers()
    )
    assert isinstance(layers, list) and len(layers) == backbone.num_layers
    np.testing.assert_array_equal(
        ops.convert_to_numpy(hidden_l), ops.convert_to_numpy(hidden)
    )
    for a, b in zip(RWKV6State.from_layers(layers), whole):
        np.testing.assert_array_equal(
            ops.convert_to_numpy(a), ops.convert_to_numpy(b)
        )


def test_token_by_token_equals_whole():
    # Decoding steps (T = 1) run the same layers as the sequence path.
    backbone = tiny_backbone()
    ids = tokens(10, seed=2)
    whole, _ = backbone.call_with_state(ids)
    state, steps = None, []
    for t in range(ids.shape[1]):
        h, state = backbone.call_with_state(ids[:, t : t + 1], state=state)
        steps.append(logits(backbone, h))
    assert (
        relative_error(np.concatenate(steps, 1), logits(backbone, whole)) <= TOL
    )


@pytest.mark.parametrize("with_state", [False, True])
def test_left_padding_leaves_real_tokens_unchanged(with_state):
    backbone = tiny_backbone()
    state = None
    if with_state:
        _, state = backbone.call_with_state(tokens(6, seed=3))
    ids = tokens(8, seed=4)
    ref, ref_state = backbone.call_with_state(ids, state=state)

    padded = np.concatenate([np.zeros((1, 5), int), ids], axis=1)
    mask = np.concatenate([np.zeros((1, 5)), np.ones((1, 8))], 1)
    # A batch whose second row is unpadded: rows must not interact.
    batch_ids = np.concatenate([padded, tokens(13, seed=5)])
    batch_mask = np.concatenate([mask, np.ones((1, 13))]).astype("int32")
    if state is not None:
        state = state.broadcast_to(2)
    out, out_state = backbone.call_with_state(batch_ids, batch_mask, state)
    assert (
        relative_error(logits(backbone, out)[:1, 5:], logits(backbone, ref))
        <= TOL
    )
    for a, b in zip(out_state, ref_state):
        assert (
            relative_error(ops.convert_to_numpy(a)[:1], ops.convert_to_numpy(b))
            <= TOL
        )


def test_right_padding_final_state_is_last_real_token():
    backbone = tiny_backbone()
    ids = tokens(7, seed=6)
    _, ref_state = backbone.call_with_state(ids)
    padded = np.concatenate([ids, np.zeros((1, 4), int)], 1)
    mask = np.concatenate([np.ones((1, 7)), np.zeros((1, 4))], 1)
    _, state = backbone.call_with_state(padded, mask.astype("int32"))
    for a, b in zip(state, ref_state):
        assert (
            relative_error(ops.convert_to_numpy(a), ops.convert_to_numpy(b))
            <= TOL
        )


def test_all_padding_row_keeps_the_state():
    backbone = tiny_backbone()
    _, state = backbone.call_with_state(tokens(5, seed=7))
    _, same = backbone.call_with_state(
        np.zeros((1, 3), int), np.zeros((1, 3), "int32"), state
    )
    for a, b in zip(same, state):
        np.testing.assert_array_equal(
            ops.convert_to_numpy(a), ops.convert_to_numpy(b)
        )


@pytest.mark.parametrize("length", [1, 3])
def test_bfloat16_model_keeps_its_float32_state(length):
    """A bfloat16 model's WKV state stays float32 through the layers (Keras
    would cast a layer's floating arguments to bfloat16): pads leave it
    exactly as it was, sequence and step alike."""
    backbone = tiny_backbone(dtype="bfloat16")
    _, state = backbone.call_with_state(tokens(5, seed=7))
    # Not representable in bfloat16: a cast on the way would show.
    wkv = state.wkv + np.float32(1e-4)
    state = RWKV6State(wkv, state.shift)
    _, same = backbone.call_with_state(
        np.zeros((1, length), int), np.zeros((1, length), "int32"), state
    )
    np.testing.assert_array_equal(
        ops.convert_to_numpy(same.wkv), ops.convert_to_numpy(state.wkv)
    )


def test_layers_take_arrays_positionally():
    """The layers convert their inputs themselves (Keras's conversion is
    off for them, see above): numpy arrays work, as in their docstrings."""
    from keras_rwkv.models.rwkv6.rwkv6_block import RWKV6Block
    from keras_rwkv.models.rwkv6.rwkv6_token_shift import shift_indices

    block = RWKV6Block(hidden_dim=128, intermediate_dim=256, dtype="bfloat16")
    x = np.random.default_rng(0).random((2, 5, 128)).astype("float32")
    mask = np.ones((2, 5), "int32")
    y, (shift_tm, _, wkv) = block(x, mask, *shift_indices(mask))
    assert "bfloat16" in str(y.dtype) and tuple(y.shape) == x.shape
    assert "float32" in str(wkv.dtype)
    out, _ = block.time_mix(x, x, mask, None)
    assert tuple(out.shape) == x.shape


def test_state_broadcast_errors():
    backbone = tiny_backbone()
    state = RWKV6State.zeros(backbone, batch_size=2)
    with pytest.raises(ValueError, match="batch of 3"):
        backbone.call_with_state(tokens(4, batch=3), state=state)


@pytest.mark.parametrize("policy", ["bfloat16", "mixed_bfloat16"])
def test_low_precision_policies(policy):
    ref_model = tiny_backbone()
    model = tiny_backbone(dtype=policy)
    model.set_weights(ref_model.get_weights())
    ids = tokens(20, seed=8)
    ref, _ = ref_model.call_with_state(ids)
    out, state = model.call_with_state(ids)
    assert "bfloat16" in str(out.dtype)
    assert "float32" in str(state.wkv.dtype)
    assert "bfloat16" in str(state.shift.dtype)
    # Decay parameters keep their storage dtype and are used in float32.
    tm = model.transformer_layers[0].time_mix
    expected = "float32" if policy == "mixed_bfloat16" else "bfloat16"
    assert tm.time_decay.dtype == expected
    err = relative_error(logits(model, out), logits(ref_model, ref))
    assert err <= 5e-2, f"{policy} logits drift {err:.3f} from float32"


def test_trains_with_fit():
    backbone = tiny_backbone()
    ids = tokens(16, seed=9, batch=4)
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    inputs = {
        name: keras.Input((None,), dtype="int32", name=name)
        for name in ("token_ids", "padding_mask")
    }
    hidden = backbone(inputs)
    model = keras.Model(inputs, backbone.token_embedding(hidden, reverse=True))
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    y = np.roll(ids, -1, axis=1)
    history = model.fit(x, y, epochs=8, batch_size=4, verbose=0)
    assert history.history["loss"][-1] < 0.8 * history.history["loss"][0]


def test_save_to_preset_round_trip(tmp_path):
    backbone = tiny_backbone()
    backbone.save_to_preset(tmp_path / "preset")
    loaded = RWKV6Backbone.from_preset(str(tmp_path / "preset"))
    ids = tokens(6, seed=10)
    a, _ = backbone.call_with_state(ids)
    b, _ = loaded.call_with_state(ids)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(a), ops.convert_to_numpy(b)
    )


def test_rejects_bad_head_size():
    with pytest.raises(ValueError, match="multiple of head_size"):
        RWKV6Backbone(**{**TINY, "hidden_dim": 100})


def test_runtime_knobs_stay_out_of_the_saved_config():
    backbone = tiny_backbone(wkv_kernel="python", wkv_chunk_size=8)
    config = backbone.get_config()
    assert "wkv_kernel" not in config and "wkv_chunk_size" not in config
    # A config that still has them (saved before) loads, and a knob can be
    # chosen again when loading.
    old = {**config, "wkv_kernel": "python", "wkv_chunk_size": 4}
    again = RWKV6Backbone.from_config(old)
    assert again.wkv_kernel == "python" and again.wkv_chunk_size == 4
    assert RWKV6Backbone.from_config(config).wkv_kernel == "auto"
