"""The forward pass of `fit`, `evaluate` and `predict` on torch with
`jit_compile=True` (`rwkv6_torch_forward.py`): the same training as eager
torch for state tuning, LoRA and a full fine-tune, one program per shape
and mask form, weights assigned or frozen later seen, and an eager
fallback with one warning. Runs in the torch pass; the GPU test (inductor,
CUDA WKV kernel) on a machine with one."""

import warnings

import keras
import numpy as np
import pytest

from keras_rwkv import RWKV6Backbone
from keras_rwkv import RWKV6CausalLM
from tests.test_torch_step import TINY

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "torch", reason="the torch forward"
)


def build(what, jit, **kwargs):
    keras.utils.set_random_seed(0)
    lm = RWKV6CausalLM(RWKV6Backbone(**TINY, **kwargs))
    if what == "state":
        lm.enable_state_tuning(time_shift=True)
    elif what == "lora":
        lm.backbone.enable_lora(4)
    lm.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=jit)
    return lm


def batch(seed=0, length=12, mask_rows=None):
    """Random ids, a mask (row 1 right-padded unless `mask_rows`), labels
    and weights."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 300, (2, length + 1)).astype("int32")
    mask = np.ones((2, length), "int32")
    mask[1, length - 3 :] = 0
    if mask_rows is not None:
        mask = np.array(mask_rows, "int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": mask}
    return x, ids[:, 1:], mask


def numpy(values):
    return [keras.ops.convert_to_numpy(v) for v in values]


def programs(lm):
    return [k for k in lm._compiled_functions if k[0] == "torch_forward"]


@pytest.mark.parametrize("what", ["state", "lora", "full"])
def test_training_through_the_program_matches_eager(what):
    x, y, w = batch()
    trained = {}
    for jit in (False, True):
        lm = build(what, jit)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", "keras_rwkv: could not")
            losses = [lm.train_on_batch(x, y, sample_weight=w)[0]]
            losses.append(lm.train_on_batch(x, y, sample_weight=w)[0])
        trained[jit] = losses, numpy(lm.trainable_variables), lm
    (eager_losses, eager_vars, _), (jit_losses, jit_vars, lm) = (
        trained[False],
        trained[True],
    )
    np.testing.assert_allclose(jit_losses, eager_losses, rtol=1e-5)
    assert eager_losses[1] < eager_losses[0]  # it trains at all
    for got, want in zip(jit_vars, eager_vars):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert len(programs(lm)) == 1
    # Keras's own torch.compile of the train step stays off.
    assert not hasattr(lm.train_function, "_torchdynamo_orig_callable")
    assert lm.jit_compile is True


def test_one_program_per_shape_and_mask_form():
    lm = build("state", True)
    x, y, _ = batch()
    lm.train_on_batch(x, y)
    lm.train_on_batch(*batch(seed=1)[:2])  # same shape, same form
    assert len(programs(lm)) == 1
    lm.train_on_batch(*batch(length=9)[:2])
    assert len(programs(lm)) == 2
    # A hole in a row's mask: the token shift's general form, its own
    # program, the same logits as eager.
    holes = [[1] * 12, [1, 1, 0, 0, 1, 1] + [1] * 6]
    x = batch(mask_rows=holes)[0]
    lm.predict_on_batch(x)
    assert len(programs(lm)) == 3
    fresh, eager = build("state", True), build("state", False)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(fresh.predict_on_batch(x)),
        keras.ops.convert_to_numpy(eager.predict_on_batch(x)),
        rtol=1e-5,
        atol=1e-5,
    )
    assert [k[-1] for k in programs(fresh)] == [False]  # not contiguous


def test_a_smaller_last_batch_runs_the_program_padded():
    """`fit` over 5 rows in batches of 2: the last batch (1 row) runs the
    batch-2 program padded, no program of its own, and trains, evaluates
    and predicts as eager torch does."""
    rng = np.random.default_rng(3)
    ids = rng.integers(1, 300, (5, 11)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((5, 10), "int32")}
    x["padding_mask"][4, 7:] = 0  # the lone last row right-padded
    y = ids[:, 1:]
    results = {}
    for jit in (False, True):
        lm = build("state", jit)
        history = keras.Model.fit(
            lm, x, y, batch_size=2, epochs=2, shuffle=False, verbose=0
        )
        logits = keras.Model.predict(lm, x, batch_size=2, verbose=0)
        loss = keras.Model.evaluate(lm, x, y, batch_size=2, verbose=0)
        results[jit] = (
            history.history["loss"],
            numpy(lm.trainable_variables),
            logits,
            loss,
        )
        if jit:
            assert [k[1] for k in programs(lm)] == [(2, 10)]
    (e_hist, e_vars, e_logits, e_loss) = results[False]
    (j_hist, j_vars, j_logits, j_loss) = results[True]
    np.testing.assert_allclose(j_hist, e_hist, rtol=1e-5)
    for got, want in zip(j_vars, e_vars):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(j_logits, e_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(j_loss, e_loss, rtol=1e-5)
    assert j_logits.shape == (5, 10, 300)


def test_weights_assigned_or_frozen_later_are_seen():
    x, y, _ = batch()
    lm, eager = build("full", True), build("full", False)
    lm.train_on_batch(x, y)
    eager.train_on_batch(x, y)
    # Assigned: the program's inputs are the variables' current values.
    for model in (lm, eager):
        kernel = model.backbone.transformer_layers[0].time_mix.output_dense
        kernel.kernel.assign(kernel.kernel.value * 2.0)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(lm.predict_on_batch(x)),
        keras.ops.convert_to_numpy(eager.predict_on_batch(x)),
        rtol=1e-5,
        atol=1e-5,
    )
    # Frozen (then compiled again, as Keras asks when what trains
    # changes): it gets no update, the rest still trains.
    block = lm.backbone.transformer_layers[1]
    block.trainable = False
    lm.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=True)
    before = numpy(block.weights)
    other = lm.backbone.transformer_layers[0].channel_mix.weights
    other_before = numpy(other)
    lm.train_on_batch(x, y)
    for got, want in zip(numpy(block.weights), before):
        np.testing.assert_array_equal(got, want)
    assert any(
        not np.array_equal(a, b) for a, b in zip(numpy(other), other_before)
    )


def test_evaluate_and_predict_match_eager():
    x, y, w = batch()
    lm, eager = build("lora", True), build("lora", False)
    np.testing.assert_allclose(
        lm.evaluate(x, y, sample_weight=w, verbose=0),
        eager.evaluate(x, y, sample_weight=w, verbose=0),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        lm.predict(x, verbose=0), eager.predict(x, verbose=0), rtol=1e-5
    )


def test_untraceable_forward_trains_eagerly_with_a_warning(monkeypatch):
    import torch

    def refuse(*args, **kwargs):
        raise RuntimeError("cannot trace this")

    monkeypatch.setattr(torch.export, "export", refuse)
    x, y, _ = batch()
    lm, eager = build("state", True), build("state", False)
    with pytest.warns(UserWarning, match="forward pass .* running it eagerly"):
        got = lm.train_on_batch(x, y)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "keras_rwkv: could not")
        lm.train_on_batch(x, y)  # once only
    np.testing.assert_allclose(got, eager.train_on_batch(x, y), rtol=1e-6)


def test_compiled_mode_trains_like_eager(monkeypatch):
    """A torch.compile mode (here over AOTAutograd without inductor's code
    generation, which takes a minute on a CPU; the GPU test runs inductor):
    forward and backward through the compiled graph."""
    import torch

    compile_ = torch.compile
    monkeypatch.setenv("KERAS_RWKV_TORCH_TRAIN_MODE", "default")
    monkeypatch.setattr(
        torch,
        "compile",
        lambda fn, **kwargs: compile_(fn, backend="aot_eager", dynamic=False),
    )
    x, y, w = batch()
    lm, eager = build("lora", True), build("lora", False)
    for _ in range(2):
        got = lm.train_on_batch(x, y, sample_weight=w)
        want = eager.train_on_batch(x, y, sample_weight=w)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(
        numpy(lm.trainable_variables), numpy(eager.trainable_variables)
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_graph_modes_hand_out_copies(monkeypatch):
    """Under torch's CUDA graphs (the GPU default) a compiled call's
    outputs are rewritten by the next replay; on the CPU a stand-in
    program that writes every result into one buffer: `predict` over
    several batches still keeps each batch's logits, and each call starts
    a step of torch's graphs."""
    import torch

    steps = []

    def compile_(fn, **kwargs):
        assert kwargs["mode"] == "reduce-overhead"
        buffer = {}

        def run(*args):
            out = fn(*args)
            buffer.setdefault("out", torch.empty_like(out)).copy_(out)
            return buffer["out"]

        return run

    monkeypatch.setenv("KERAS_RWKV_TORCH_TRAIN_MODE", "reduce-overhead")
    monkeypatch.setattr(torch, "compile", compile_)
    monkeypatch.setattr(
        torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1)
    )
    x = batch()[0]
    many = {k: np.concatenate([v, v[::-1]]) for k, v in x.items()}
    lm, eager = build("state", True), build("state", False)
    got = lm.predict(many, batch_size=2, verbose=0)
    np.testing.assert_allclose(
        got, eager.predict(many, batch_size=2, verbose=0), rtol=1e-5, atol=1e-5
    )
    assert len(steps) == 2


def test_a_bad_train_mode_is_named(monkeypatch):
    monkeypatch.setenv("KERAS_RWKV_TORCH_TRAIN_MODE", "fastest")
    lm = build("state", True)
    x, y, _ = batch()
    with pytest.raises(ValueError, match="KERAS_RWKV_TORCH_TRAIN_MODE"):
        lm.train_on_batch(x, y)


def test_trains_on_a_gpu_like_eager():
    """On a GPU (the default mode: inductor's compiled forward and
    backward replayed as CUDA graphs), over the CUDA WKV kernel, against
    eager torch; `predict` over several batches keeps each batch's logits
    (a graph's outputs are rewritten at its next replay)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    x, y, w = batch(length=64)
    many = {k: np.concatenate([v, v[::-1]]) for k, v in x.items()}
    results = {}
    for jit in (False, True):
        lm = build("state", jit, wkv_kernel="cuda")
        with warnings.catch_warnings():
            warnings.filterwarnings("error", "keras_rwkv: could not")
            for _ in range(3):
                loss = lm.train_on_batch(x, y, sample_weight=w)
            # Keras's own loop over ready inputs: KerasHub's `predict` adds
            # only the batching, through grain or tf.data, which a bare GPU
            # image may lack.
            logits = keras.Model.predict(lm, many, batch_size=2, verbose=0)
        results[jit] = loss, numpy(lm.trainable_variables), logits
    np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-4)
    for a, b in zip(results[True][1], results[False][1]):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(
        results[True][2], results[False][2], rtol=1e-3, atol=1e-3
    )
    assert not np.allclose(results[True][2][:2], results[True][2][2:])
