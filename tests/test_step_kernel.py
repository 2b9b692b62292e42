"""The decoding step's projections on the step kernel's contract (CPU).

The CUDA kernel itself is checked against `reference_call` on a GPU
(tests/test_matvec_cuda.py). Here a stand-in with the same contract takes
its place, so that what the layers send it, and the gradients, are checked
everywhere JAX runs.
"""

import gc

import keras
import numpy as np
import pytest
from keras import ops

from keras_rwkv import RWKV6Backbone
from keras_rwkv.models.rwkv6 import rwkv6_projection
from keras_rwkv.utils import settings
from tests.reference import relative_error
from tests.test_backbone import TINY

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "jax", reason="the step kernel is JAX's"
)


@pytest.fixture
def calls(monkeypatch):
    """Puts the plain-JAX stand-in in place of the kernel; returns the
    list of `(kind, matrix count)` it was called with."""
    from keras_rwkv.ops.matvec import jax_binding

    seen = []

    def call(kind, operands):
        seen.append((kind, len(operands) // jax_binding.GROUP[kind]))
        return jax_binding.reference_call(kind, operands)

    op = jax_binding.make_matvec(call)
    monkeypatch.setattr(rwkv6_projection, "step_matvec", lambda: op)
    monkeypatch.setattr(gc, "collect", lambda generation=2: 0)
    return seen


def dense(units=64, seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    layer = keras.layers.Dense(
        units, use_bias=False, dtype="bfloat16", **kwargs
    )
    layer.build((None, None, 96))
    return layer


def step_input(batch, seed=1):
    x = np.random.default_rng(seed).normal(size=(batch, 1, 96))
    return ops.cast(x, "bfloat16")


def weight_only_int8():
    from keras.quantizers import AbsMaxQuantizer
    from keras.quantizers import Int8QuantizationConfig

    return Int8QuantizationConfig(
        weight_quantizer=AbsMaxQuantizer(axis=0), activation_quantizer=None
    )


def as_float(x):
    return ops.convert_to_numpy(ops.cast(x, "float32"))


@pytest.mark.parametrize("batch", [1])
@pytest.mark.parametrize("quantize", [None, "int8", "int8_weights"])
def test_kernel_products_equal_the_layers(calls, batch, quantize):
    layers = [dense(64 + 16 * i, seed=i) for i in range(5)]
    if quantize:
        config = weight_only_int8() if quantize == "int8_weights" else None
        for layer in layers:
            layer.quantize("int8", config=config)
    xs = [step_input(batch, seed=i) for i in range(5)]
    got = rwkv6_projection.project_many(list(zip(layers, xs)))
    if quantize == "int8":
        # Keras's default int8 (W8A8) stays on XLA (rwkv6_projection.py).
        assert calls == []
    else:
        # Five products: four in one launch, the fifth in another; int8
        # weights with a bfloat16 input are the kernel's kind 1.
        kind = {None: 0, "int8_weights": 1}[quantize]
        assert calls == [(kind, 4), (kind, 1)]
    for layer, x, y in zip(layers, xs, got):
        assert tuple(y.shape) == (batch, 1, layer.units)
        # bfloat16 outputs: a few of its ulps apart (sums in another order;
        # Keras rounds int8's integer sums to bfloat16 before scaling).
        assert relative_error(as_float(y), as_float(layer(x))) < 1e-2


def test_layers_the_kernel_does_not_take(calls):
    lora = dense(seed=1)
    lora.enable_lora(4)
    biased = keras.layers.Dense(64, dtype="bfloat16")
    biased.build((None, None, 96))
    float32 = keras.layers.Dense(64, use_bias=False)
    float32.build((None, None, 96))
    x = step_input(1)
    for layer in (lora, biased):
        y = rwkv6_projection.project(layer, x)
        np.testing.assert_array_equal(as_float(y), as_float(layer(x)))
    rwkv6_projection.project(float32, ops.cast(x, "float32"))
    plain = dense()
    rwkv6_projection.project(plain, step_input(2))  # over one row
    seq = ops.cast(np.ones((1, 2, 96)), "bfloat16")
    rwkv6_projection.project(plain, seq)  # not a step
    assert calls == []


def test_gradients_through_the_kernel(calls):
    import jax
    import jax.numpy as jnp

    layer = dense(seed=4)
    x = jnp.asarray(step_input(1), jnp.float32)
    kernel = jnp.asarray(ops.convert_to_tensor(layer.kernel), jnp.float32)

    def loss(fn):
        def f(x, kernel):
            layer.kernel.assign(kernel.astype(jnp.bfloat16))
            y = fn(x.astype(jnp.bfloat16))
            return jnp.sum(jnp.sin(y.astype(jnp.float32)))

        return f

    def through_xla(x):
        return jnp.matmul(x, ops.convert_to_tensor(layer.kernel))

    ref = jax.grad(loss(through_xla), argnums=(0, 1))(x, kernel)
    got = jax.grad(
        loss(lambda x: rwkv6_projection.project(layer, x)), argnums=(0, 1)
    )(x, kernel)
    assert calls == [(0, 1)]
    for g, r in zip(got, ref):
        assert relative_error(np.asarray(g), np.asarray(r)) < 2e-2


@pytest.mark.parametrize("quantize", [None, "int8_weights"])
def test_model_step_on_the_kernel(calls, quantize):
    """A bfloat16 (or weight-only int8) model's steps, with and without
    the kernel, continue a prompt to the same logits (to bfloat16
    precision; int8: as close to the float model's as XLA's int8 logits
    are)."""
    keras.utils.set_random_seed(0)
    backbone = RWKV6Backbone(**TINY, dtype="bfloat16")
    ids = np.random.default_rng(0).integers(1, 97, (1, 6)).astype("int32")
    mask = np.ones_like(ids)

    def step():
        _, state = backbone.call_with_state(ids[:, :5], mask[:, :5])
        hidden, _ = backbone.call_with_state(
            ids[:, 5:], mask[:, 5:], state=state
        )
        return as_float(backbone.token_embedding(hidden, reverse=True))

    if quantize:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(rwkv6_projection, "step_matvec", lambda: None)
            unquantized = step()
        backbone.quantize("int8", config=weight_only_int8())
    with_kernel = step()
    assert len(calls) == 2 * TINY["num_layers"] * 2  # rkvg + output, ffn 2
    calls.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rwkv6_projection, "step_matvec", lambda: None)
        without = step()
    assert calls == []
    if not quantize:
        assert relative_error(with_kernel, without) < 2e-2
        return
    # Keras rounds int8's integer sums to bfloat16 before scaling them,
    # the kernel after: the two differ by more than bfloat16's rounding,
    # but neither is further from the float model.
    assert relative_error(with_kernel, without) < 5e-2
    xla_error = relative_error(without, unquantized)
    assert relative_error(with_kernel, unquantized) < 1.25 * xla_error + 1e-2


def test_bad_step_kernel_setting(monkeypatch):
    monkeypatch.setenv("KERAS_RWKV_STEP_KERNEL", "fast")
    with pytest.raises(ValueError, match="KERAS_RWKV_STEP_KERNEL"):
        settings.step_kernel()
    monkeypatch.setenv("KERAS_RWKV_STEP_KERNEL", "xla")
    from keras_rwkv.ops.matvec import step_matvec

    assert step_matvec() is None
    monkeypatch.setenv("KERAS_RWKV_STEP_KERNEL", "cuda")
    from keras_rwkv.ops.matvec import StepKernelUnavailable

    # No GPU here: asked for, it says why it cannot run.
    with pytest.raises(StepKernelUnavailable, match="cannot run"):
        step_matvec()
