"""A batch-1 step through the fused step ops' contract (CPU).

The CUDA kernels are held to the plain-JAX references on a GPU
(tests/test_step_fusion_cuda.py). Here the references stand in for them,
so what the layers send the ops, and the gradients, are checked wherever
JAX runs: a bfloat16 model's step gives the unfused step's logits and
state, pads leave the state alone, and gradients match.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_rwkv import RWKV6Backbone
from keras_rwkv.models.rwkv6 import rwkv6_step_fusion
from tests.reference import relative_error
from tests.test_backbone import TINY

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "jax", reason="the fused step is JAX's"
)


@pytest.fixture
def calls(monkeypatch):
    """Puts the references in place of the kernels; returns the names of
    the ops called, in order."""
    import types

    from keras_rwkv.ops.matvec import fused_step

    seen = []

    def counted(name):
        op = getattr(fused_step.reference, name)

        def call(*args, **kwargs):
            seen.append(name)
            return op(*args, **kwargs)

        return call

    stand_in = types.SimpleNamespace(
        **{n: counted(n) for n in ("add_norm", "mix", "wkv_gate")}
    )
    monkeypatch.setattr(rwkv6_step_fusion, "step_fused", lambda: stand_in)
    return seen


def as_float(x):
    return ops.convert_to_numpy(ops.cast(x, "float32"))


def tiny(seed=0):
    keras.utils.set_random_seed(seed)
    return RWKV6Backbone(**TINY, dtype="bfloat16")


def step(backbone, ids, mask, state):
    hidden, new_state = backbone.call_with_state(ids, mask, state=state)
    logits = backbone.token_embedding(hidden, reverse=True)
    return as_float(logits), new_state


def unfused(monkeypatch, fn):
    with monkeypatch.context() as patch:
        patch.setattr(rwkv6_step_fusion, "step_fused", lambda: None)
        return fn()


def test_fused_step_gives_the_unfused_logits_and_state(calls, monkeypatch):
    backbone = tiny()
    ids = np.random.default_rng(0).integers(1, 97, (1, 6)).astype("int32")
    mask = np.ones_like(ids)
    _, state = backbone.call_with_state(ids[:, :5], mask[:, :5])
    assert calls == []  # a sequence is not a step
    got, got_state = step(backbone, ids[:, 5:], mask[:, 5:], state)
    per_layer = ["add_norm", "mix", "wkv_gate", "add_norm"]
    assert calls == per_layer * TINY["num_layers"]
    want, want_state = unfused(
        monkeypatch, lambda: step(backbone, ids[:, 5:], mask[:, 5:], state)
    )
    # bfloat16 activations, summed in another order: a few ulps.
    assert relative_error(got, want) < 2e-2
    for g, w in zip(got_state.layers(), want_state.layers()):
        for a, b in zip(g, w):
            assert relative_error(as_float(a), as_float(b)) < 2e-2


def test_a_padded_step_leaves_the_state_alone(calls):
    backbone = tiny(1)
    ids = np.random.default_rng(1).integers(1, 97, (1, 5)).astype("int32")
    _, state = backbone.call_with_state(ids, np.ones_like(ids))
    _, after = step(backbone, ids[:, :1], np.zeros((1, 1), "int32"), state)
    assert calls  # the fused ops ran
    for g, w in zip(after.layers(), state.layers()):
        for a, b in zip(g, w):
            np.testing.assert_array_equal(as_float(a), as_float(b))


def test_gradients_through_the_fused_step(calls, monkeypatch):
    import jax
    import jax.numpy as jnp

    backbone = tiny(2)
    ids = np.array([[5]], "int32")
    mask = np.ones_like(ids)
    _, state = backbone.call_with_state(
        np.array([[3, 9, 4]], "int32"), np.ones((1, 3), "int32")
    )
    block = backbone.transformer_layers[0]
    weights = [block.time_mix.time_maa_w1, block.ln1.gamma]
    values = [jnp.asarray(w.value, jnp.float32) for w in weights]

    def loss(values):
        for w, v in zip(weights, values):
            w.assign(v.astype(w.dtype))
        logits, _ = backbone.call_with_state(ids, mask, state=state)
        return jnp.sum(jnp.sin(logits.astype(jnp.float32)))

    got = jax.grad(loss)(values)
    assert "mix" in calls
    want = unfused(monkeypatch, lambda: jax.grad(loss)(values))
    for g, w in zip(got, want):
        assert relative_error(np.asarray(g), np.asarray(w)) < 5e-2


def test_layers_the_fused_step_does_not_take(calls):
    odd = dict(TINY, hidden_dim=96, head_size=32)
    keras.utils.set_random_seed(0)
    backbone = RWKV6Backbone(**odd, dtype="bfloat16")
    ids = np.array([[5]], "int32")
    backbone.call_with_state(ids, np.ones_like(ids))
    # Norms still fuse; the time mix (head size 32) stays on XLA.
    assert "mix" not in calls and "add_norm" in calls
    calls.clear()
    float32 = RWKV6Backbone(**TINY)
    float32.call_with_state(ids, np.ones_like(ids))
    two = np.array([[5], [6]], "int32")
    tiny().call_with_state(two, np.ones_like(two))
    assert calls == []
