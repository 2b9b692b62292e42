"""State tuning, LoRA and full fine-tuning with fit()."""

import keras
import numpy as np
import pytest
import torch
from keras import ops

from keras_rwkv import RWKV6CausalLM
from keras_rwkv import RWKV6CausalLMPreprocessor
from keras_rwkv import RWKV6State
from keras_rwkv import RWKV6Tokenizer
from keras_rwkv.convert import convert_checkpoint
from tests.backend_utils import value_and_grad
from tests.reference import blinkdl_forward
from tests.reference import blinkdl_model
from tests.reference import random_rwkv6_state_dict
from tests.reference import relative_error
from tests.reference import save_checkpoint

WORLD = dict(vocab=65536, layers=2, hidden=128, ffn=256, d_mix=8, d_dec=16)
SMALL = dict(vocab=300, layers=2, hidden=128, ffn=256, d_mix=8, d_dec=16)


@pytest.fixture(scope="module")
def world_pth(tmp_path_factory):
    path = tmp_path_factory.mktemp("st") / "world.pth"
    return save_checkpoint(path, random_rwkv6_state_dict(**WORLD, seed=0))


@pytest.fixture(scope="module")
def small_sd():
    return random_rwkv6_state_dict(**SMALL, seed=4)


def text_lm(pth, sequence_length=12):
    backbone = convert_checkpoint(pth, dtype="float32", progress=False)
    pre = RWKV6CausalLMPreprocessor(
        RWKV6Tokenizer(), sequence_length=sequence_length
    )
    return RWKV6CausalLM(backbone, pre)


def weights_by_path(model):
    return {v.path: ops.convert_to_numpy(v).copy() for v in model.weights}


@pytest.mark.slow
def test_state_tuning_learns_a_reply_and_touches_nothing_else(world_pth):
    keras.utils.set_random_seed(0)
    lm = text_lm(world_pth)
    prompt = "User: ping\n\nAssistant:"
    before_text = lm.generate(prompt, max_new_tokens=3, stop_token_ids=None)
    lm.enable_state_tuning(time_shift=True)
    trainable = sorted(v.path for v in lm.trainable_variables)
    assert trainable == sorted(
        f"block_{i}/{name}"
        for i in range(2)
        for name in ("initial_wkv", "initial_shift")
    )
    frozen_before = {
        k: v for k, v in weights_by_path(lm).items() if "initial_" not in k
    }
    lm.compile(optimizer=keras.optimizers.Adam(1.0), sampler="greedy")
    history = lm.fit(
        [prompt + " pong!"] * 4, epochs=40, batch_size=4, verbose=0
    )
    losses = history.history["loss"]
    assert losses[-1] <= 0.5 * losses[0], losses
    after = weights_by_path(lm)
    for path, value in frozen_before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)
    # Generation starts from the tuned state (no explicit state given) ...
    text = lm.generate(prompt, max_new_tokens=3, stop_token_ids=None)
    assert text.startswith(prompt + " pong") and text != before_text
    # ... exactly as if that state were passed explicitly.
    explicit = lm.generate(
        prompt,
        max_new_tokens=3,
        stop_token_ids=None,
        state=lm.backbone.initial_state(1),
    )
    assert explicit == text


@pytest.mark.parametrize("time_shift", [False, True])
def test_gradient_of_the_initial_state_matches_finite_differences(
    small_sd, tmp_path, time_shift
):
    pth = save_checkpoint(tmp_path / "m.pth", small_sd)
    backbone = convert_checkpoint(pth, dtype="float32", progress=False)
    ids = np.random.default_rng(0).integers(1, 300, (2, 9))
    rng = np.random.default_rng(1)
    weights = ops.convert_to_tensor(
        rng.normal(0, 1, (2, 9, 300)).astype("float32")
    )
    zero = RWKV6State.zeros(backbone, 1)
    wkv0 = rng.normal(0, 0.5, zero.wkv.shape).astype("float32")
    shift0 = rng.normal(0, 0.5, zero.shift.shape).astype("float32")

    def loss(wkv, shift):
        if not time_shift:
            shift = ops.convert_to_tensor(shift0)
        hidden, _ = backbone.call_with_state(ids, state=RWKV6State(wkv, shift))
        logits = backbone.token_embedding(hidden, reverse=True)
        return ops.mean(logits * weights)

    _, (g_wkv, g_shift) = value_and_grad(loss, [wkv0, shift0])
    eps = 1e-2
    for seed in range(3):
        d = np.random.default_rng(10 + seed)
        d_wkv = d.normal(0, 1, wkv0.shape).astype("float32")
        d_shift = (
            d.normal(0, 1, shift0.shape)
            if time_shift
            else np.zeros_like(shift0)
        ).astype("float32")
        plus = float(loss(wkv0 + eps * d_wkv, shift0 + eps * d_shift))
        minus = float(loss(wkv0 - eps * d_wkv, shift0 - eps * d_shift))
        numeric = (plus - minus) / (2 * eps)
        analytic = float((g_wkv * d_wkv).sum() + (g_shift * d_shift).sum())
        assert abs(numeric - analytic) <= 2e-2 * abs(analytic) + 1e-6, (
            numeric,
            analytic,
        )
    if not time_shift:
        assert np.abs(g_shift).max() == 0


@pytest.mark.skipif(keras.config.backend() != "jax", reason="jax.grad")
def test_tuned_variables_get_the_explicit_state_gradient(small_sd, tmp_path):
    import jax

    pth = save_checkpoint(tmp_path / "m.pth", small_sd)
    backbone = convert_checkpoint(pth, dtype="float32", progress=False)
    backbone.enable_state_tuning(time_shift=True)
    rng = np.random.default_rng(2)
    backbone.set_tuned_state_arrays(
        rng.normal(0, 0.5, (2, 2, 64, 64)), rng.normal(0, 0.5, (2, 2, 128))
    )
    ids = rng.integers(1, 300, (3, 7))
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    weights = rng.normal(0, 1, (3, 7, 128)).astype("float32")
    trainable = [v.value for v in backbone.trainable_variables]
    non_trainable = [v.value for v in backbone.non_trainable_variables]

    def loss(trainable):
        out, _ = backbone.stateless_call(trainable, non_trainable, inputs)
        return (out * weights).mean()

    grads = jax.grad(loss)(trainable)
    by_path = dict(zip([v.path for v in backbone.trainable_variables], grads))
    state = backbone.initial_state(3)

    def explicit(wkv, shift):
        hidden, _ = backbone.call_with_state(ids, state=RWKV6State(wkv, shift))
        return (hidden * weights).mean()

    g_wkv, g_shift = jax.grad(explicit, argnums=(0, 1))(state.wkv, state.shift)
    np.testing.assert_allclose(
        by_path["block_1/initial_wkv"],
        np.asarray(g_wkv).sum(0)[1],
        rtol=1e-4,
        atol=1e-7,
    )
    np.testing.assert_allclose(
        by_path["block_0/initial_shift"],
        np.asarray(g_shift).sum(0)[0],
        rtol=1e-4,
        atol=1e-7,
    )


def test_time_state_export_and_import_match_blinkdl(small_sd, tmp_path):
    tokens = list(np.random.default_rng(3).integers(1, 300, 21))
    tuned = np.random.default_rng(4).normal(0, 0.5, (2, 2, 64, 64))

    # Export: our tuned state, merged into the model file, read by BlinkDL.
    pth = save_checkpoint(tmp_path / "m.pth", small_sd)
    backbone = convert_checkpoint(pth, dtype="float32", progress=False)
    backbone.enable_state_tuning(time_shift=False)
    backbone.set_tuned_state_arrays(tuned)
    state_file = backbone.export_time_state(tmp_path / "state.pth")
    merged = dict(small_sd)
    merged.update(torch.load(state_file, weights_only=True))
    merged_pth = save_checkpoint(tmp_path / "merged.pth", merged)
    ref, _, _ = blinkdl_forward(blinkdl_model(merged_pth), tokens)
    hidden, _ = backbone.call_with_state(np.array([tokens]))
    ours = ops.convert_to_numpy(backbone.token_embedding(hidden, reverse=True))
    assert relative_error(ours[0], ref) <= 1e-4
    plain, _, _ = blinkdl_forward(blinkdl_model(pth), tokens)
    assert relative_error(plain, ref) > 1e-2  # the state matters

    # Import: a PEFT file written by torch ((value, key) layout) into a
    # fresh model, and a merged model file through the converter.
    peft = {
        f"blocks.{i}.att.time_state": torch.randn(2, 64, 64) * 0.5
        for i in range(2)
    }
    peft_file = save_checkpoint(tmp_path / "peft.pth", peft)
    fresh = convert_checkpoint(pth, dtype="float32", progress=False)
    fresh.import_time_state(peft_file)
    merged = dict(small_sd)
    merged.update(peft)
    merged_pth = save_checkpoint(tmp_path / "merged2.pth", merged)
    ref, _, _ = blinkdl_forward(blinkdl_model(merged_pth), tokens)
    for model in (
        fresh,
        convert_checkpoint(merged_pth, dtype="float32", progress=False),
    ):
        hidden, _ = model.call_with_state(np.array([tokens]))
        ours = ops.convert_to_numpy(model.token_embedding(hidden, reverse=True))
        assert relative_error(ours[0], ref) <= 1e-4

    with pytest.raises(ValueError, match="drop_time_shift"):
        fresh.enable_state_tuning(time_shift=True)
        fresh.export_time_state(tmp_path / "x.pth")


def test_tuned_state_files_and_presets(small_sd, tmp_path):
    pth = save_checkpoint(tmp_path / "m.pth", small_sd)
    backbone = convert_checkpoint(pth, dtype="float32", progress=False)
    backbone.enable_state_tuning(time_shift=True)
    rng = np.random.default_rng(5)
    backbone.set_tuned_state_arrays(
        rng.normal(size=(2, 2, 64, 64)), rng.normal(size=(2, 2, 128))
    )
    ids = np.array([[5, 6, 7, 8]])
    ref, _ = backbone.call_with_state(ids)

    path = backbone.save_tuned_state(tmp_path / "tuned")
    other = convert_checkpoint(pth, dtype="float32", progress=False)
    other.load_tuned_state(path)
    assert other.tuned_state == "wkv+shift"
    out, _ = other.call_with_state(ids)
    np.testing.assert_allclose(
        ops.convert_to_numpy(out), ops.convert_to_numpy(ref), atol=1e-6
    )

    backbone.save_to_preset(str(tmp_path / "preset"))
    loaded = type(backbone).from_preset(str(tmp_path / "preset"))
    assert loaded.tuned_state == "wkv+shift"
    out, _ = loaded.call_with_state(ids)
    np.testing.assert_allclose(
        ops.convert_to_numpy(out), ops.convert_to_numpy(ref), atol=1e-6
    )


def test_calling_twice_and_lora_interplay(small_sd, tmp_path):
    pth = save_checkpoint(tmp_path / "m.pth", small_sd)
    backbone = convert_checkpoint(pth, dtype="float32", progress=False)
    backbone.enable_state_tuning(time_shift=False)
    backbone.transformer_layers[0].initial_wkv.assign(
        np.ones((2, 64, 64), "float32")
    )
    backbone.enable_state_tuning(time_shift=True)  # keeps values, adds shift
    assert backbone.tuned_state == "wkv+shift"
    assert (
        float(
            ops.convert_to_numpy(
                backbone.transformer_layers[0].initial_wkv
            ).mean()
        )
        == 1.0
    )
    backbone.enable_lora(2)  # now LoRA trains, states are frozen
    names = {v.path.split("/")[-1] for v in backbone.trainable_variables}
    assert names == {"lora_kernel_a", "lora_kernel_b"}
    backbone.enable_state_tuning()  # and back: states only
    names = {v.path.split("/")[-1] for v in backbone.trainable_variables}
    assert names == {"initial_wkv", "initial_shift"}


def test_lora_trains_only_lora_and_reloads(world_pth, tmp_path):
    keras.utils.set_random_seed(1)
    lm = text_lm(world_pth)
    lm.backbone.enable_lora(rank=4)
    trainable = {v.path for v in lm.trainable_variables}
    assert trainable and all("lora_kernel" in p for p in trainable)
    layers = {p.split("/")[-2] for p in trainable}
    assert layers == {"receptance", "key", "value", "gate", "output"}
    assert len(trainable) == 2 * 2 * 8  # a, b x 2 layers x 8 projections
    frozen = {k: v for k, v in weights_by_path(lm).items() if "lora" not in k}
    lm.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = lm.fit(
        ["The quick brown fox jumps"] * 4, epochs=5, batch_size=4, verbose=0
    )
    assert history.history["loss"][-1] < history.history["loss"][0]
    after = weights_by_path(lm)
    for path, value in frozen.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)

    lm.backbone.save_lora_weights(str(tmp_path / "adapter.lora.h5"))
    other = text_lm(world_pth)
    other.backbone.enable_lora(rank=4)
    other.backbone.load_lora_weights(str(tmp_path / "adapter.lora.h5"))
    ids = np.array([[11, 12, 13]])
    a, _, _ = lm.call_with_state(ids)
    b, _, _ = other.call_with_state(ids)
    np.testing.assert_allclose(
        ops.convert_to_numpy(a), ops.convert_to_numpy(b), atol=1e-5
    )


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_full_fine_tune_on_strings(world_pth, policy):
    keras.utils.set_random_seed(2)
    lm = text_lm(world_pth, sequence_length=16)
    if policy != "float32":
        backbone = type(lm.backbone).from_config(
            {**lm.backbone.get_config(), "dtype": policy}
        )
        backbone.set_weights(lm.backbone.get_weights())
        lm = RWKV6CausalLM(backbone, lm.preprocessor)
    lm.compile(optimizer=keras.optimizers.Adam(3e-3))
    texts = ["RWKV is an RNN with transformer-level quality.", "Hi"] * 2
    history = lm.fit(texts, epochs=6, batch_size=4, verbose=0)
    losses = history.history["loss"]
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.7 * losses[0], losses


def test_pads_carry_no_loss(world_pth):
    pre = text_lm(world_pth, sequence_length=16).preprocessor
    x, y, sw = pre(["Short", "A much longer training text here"])
    lm = RWKV6CausalLM(convert_checkpoint(world_pth, progress=False))
    lm.compile(optimizer="adam")
    x = {k: ops.convert_to_numpy(v) for k, v in x.items()}
    y, sw = ops.convert_to_numpy(y), ops.convert_to_numpy(sw)
    assert (sw == 0).any()
    base = lm.evaluate(x, y, sample_weight=sw, verbose=0, return_dict=True)
    y2 = np.where(sw == 0, 12345, y)  # change labels only where weight is 0
    changed = lm.evaluate(x, y2, sample_weight=sw, verbose=0, return_dict=True)
    assert changed["loss"] == pytest.approx(base["loss"], rel=1e-6)


def test_changing_what_trains_needs_a_compile_and_breaks_nothing(world_pth):
    lm = text_lm(world_pth)
    lm.enable_state_tuning(time_shift=True)
    lm.compile(optimizer=keras.optimizers.Adam(0.1))
    lm.fit(["User: hi\n\nAssistant: yo"], epochs=1, verbose=0)
    tuned = lm.backbone.tuned_state_arrays()
    # time_shift=False after True: the shift states stay but stop training.
    lm.enable_state_tuning(time_shift=False)
    trainable = sorted(v.path for v in lm.trainable_variables)
    assert trainable == [f"block_{i}/initial_wkv" for i in range(2)]
    before = weights_by_path(lm)
    with pytest.raises(ValueError, match="call compile"):
        lm.fit(["User: hi\n\nAssistant: yo"], epochs=1, verbose=0)
    # Nothing was touched: every variable is there, with its value.
    after = weights_by_path(lm)
    assert after.keys() == before.keys()
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value)
    np.testing.assert_array_equal(
        lm.backbone.tuned_state_arrays()["shift"], tuned["shift"]
    )
    lm.compile(optimizer=keras.optimizers.Adam(0.1))
    lm.fit(["User: hi\n\nAssistant: yo"], epochs=1, verbose=0)
    after = weights_by_path(lm)
    for i in range(2):  # the frozen shift did not move; the wkv did
        path = f"block_{i}/initial_shift"
        np.testing.assert_array_equal(after[path], before[path])
    assert any(
        not np.array_equal(
            after[f"block_{i}/initial_wkv"], before[f"block_{i}/initial_wkv"]
        )
        for i in range(2)
    )


def test_programs_see_lora_and_state_tuning_added_on_the_backbone(world_pth):
    # The compiled read program keeps the model's variable lists between
    # calls; adding LoRA or tuned states on the backbone (not through the
    # task, which drops its programs) must still reach it.
    lm = text_lm(world_pth)
    ids = {
        "token_ids": np.array([[11, 12, 13]]),
        "padding_mask": np.ones((1, 3)),
    }

    def wkv_after_read():
        return ops.convert_to_numpy(lm.prefill(ids).wkv)

    def wkv_eager():
        _, _, state = lm.call_with_state(ids["token_ids"])
        return ops.convert_to_numpy(state.wkv)

    before = wkv_after_read()
    lm.backbone.enable_lora(rank=2)
    rng = np.random.default_rng(0)
    for v in lm.backbone.trainable_variables:
        v.assign(rng.normal(0, 0.5, v.shape).astype("float32"))
    with_lora = wkv_after_read()
    assert relative_error(with_lora, before) > 1e-3
    assert relative_error(with_lora, wkv_eager()) < 1e-4

    lm.backbone.enable_state_tuning()
    for v in lm.backbone.trainable_variables:
        v.assign(rng.normal(0, 0.5, v.shape).astype("float32"))
    tuned = wkv_after_read()
    assert relative_error(tuned, with_lora) > 1e-3
    assert relative_error(tuned, wkv_eager()) < 1e-4


def test_the_training_loss_is_the_weighted_mean_token_cross_entropy():
    """What `fit` minimises, on every backend (torch computes it over
    `[B * T, V]` logits, see `RWKV6CausalLM.compute_loss`), against a
    NumPy reference on random logits, labels and padding weights."""
    from keras_rwkv import RWKV6Backbone

    keras.utils.set_random_seed(1)
    lm = RWKV6CausalLM(
        RWKV6Backbone(
            vocabulary_size=300,
            num_layers=1,
            hidden_dim=64,
            intermediate_dim=128,
            head_size=32,
            mix_lora_dim=8,
            decay_lora_dim=8,
        )
    )
    lm.compile(optimizer="adam")
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (3, 7, 300)).astype("float32")
    labels = rng.integers(0, 300, (3, 7)).astype("int32")
    weights = (rng.random((3, 7)) > 0.3).astype("float32")
    got = lm.compute_loss(
        y=ops.convert_to_tensor(labels),
        y_pred=ops.convert_to_tensor(logits),
        sample_weight=ops.convert_to_tensor(weights),
    )
    shifted = logits - logits.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_p, labels[..., None], -1)[..., 0]
    # Keras's default reduction: the weighted sum over every token slot.
    want = (nll * weights).sum() / weights.size
    np.testing.assert_allclose(
        float(ops.convert_to_numpy(got)), want, rtol=1e-5
    )
