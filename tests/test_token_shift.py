"""Token shift under every padding pattern, against a loop over tokens."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_rwkv.models.rwkv6 import rwkv6_token_shift
from keras_rwkv.models.rwkv6.rwkv6_token_shift import mask_contiguous
from keras_rwkv.models.rwkv6.rwkv6_token_shift import runs_contiguous
from keras_rwkv.models.rwkv6.rwkv6_token_shift import shift_indices
from keras_rwkv.models.rwkv6.rwkv6_token_shift import token_shift


def reference(x, state, mask):
    """previous[b, t]: the last real token before t, else the state; the
    new state: the last real token, else the state. Also the source of
    each (-1 for the state), for the gradient."""
    b, t, _ = x.shape
    previous = np.zeros_like(x)
    source = np.full((b, t), -1)
    last = np.full(b, -1)
    for i in range(b):
        prev = -1
        for j in range(t):
            source[i, j] = prev
            previous[i, j] = state[i] if prev < 0 else x[i, prev]
            if mask[i, j]:
                prev = j
        last[i] = prev
    new_state = np.stack(
        [state[i] if last[i] < 0 else x[i, last[i]] for i in range(b)]
    )
    return previous, new_state, source, last


def reference_grads(x, state, source, last, g_prev, g_state):
    dx, ds = np.zeros_like(x), np.zeros_like(state)
    b, t, _ = x.shape
    for i in range(b):
        for j in range(t):
            if source[i, j] < 0:
                ds[i] += g_prev[i, j]
            else:
                dx[i, source[i, j]] += g_prev[i, j]
        if last[i] < 0:
            ds[i] += g_state[i]
        else:
            dx[i, last[i]] += g_state[i]
    return dx, ds


MASKS = {
    "none": [[1] * 7] * 3,
    "left": [[0, 0, 1, 1, 1, 1, 1], [1] * 7, [0] * 6 + [1]],
    "right": [[1, 1, 1, 0, 0, 0, 0], [1] * 7, [1] + [0] * 6],
    "both_ends": [[0, 1, 1, 1, 0, 0, 0], [0] * 7, [1] * 7],
    "interior": [[1, 0, 1, 1, 0, 0, 1], [1] * 7, [0, 1, 0, 1, 0, 1, 0]],
    "one_token": [[1], [0], [1]],
}


@pytest.mark.parametrize("pattern", sorted(MASKS))
def test_token_shift_matches_a_loop_over_tokens(pattern):
    mask = np.array(MASKS[pattern], "int32")
    rng = np.random.default_rng(len(pattern))
    x = rng.standard_normal((3, mask.shape[1], 5)).astype("float32")
    state = rng.standard_normal((3, 5)).astype("float32")
    prev_index, last_index = shift_indices(mask)
    previous, new_state = token_shift(x, state, prev_index, last_index)
    want_prev, want_state, _, _ = reference(x, state, mask)
    np.testing.assert_allclose(ops.convert_to_numpy(previous), want_prev)
    np.testing.assert_allclose(ops.convert_to_numpy(new_state), want_state)


@pytest.mark.parametrize("pattern", sorted(MASKS))
def test_runs_contiguous_and_both_branches_agree(pattern):
    """The test says whether every row is one run of real tokens; the
    plain branch (taken when it is) and the general gather agree there."""
    mask = np.array(MASKS[pattern], "int32")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, mask.shape[1], 5)).astype("float32")
    state = rng.standard_normal((3, 5)).astype("float32")
    prev_index, last_index = shift_indices(mask)
    flag = runs_contiguous(prev_index, last_index, mask.shape[1])
    assert bool(ops.convert_to_numpy(flag)) == (pattern != "interior")
    want, _, _, _ = reference(x, state, mask)
    branches = [False] + ([True] if pattern != "interior" else [])
    for contiguous in branches:
        previous, _ = token_shift(x, state, prev_index, last_index, contiguous)
        np.testing.assert_allclose(ops.convert_to_numpy(previous), want)


@pytest.mark.parametrize("seed", range(4))
def test_the_mask_alone_tells_contiguity_like_the_indices(seed):
    """`mask_contiguous` (torch's training step asks it) agrees with
    `runs_contiguous` over `shift_indices` on random masks: runs, holes,
    empty and full rows (one shape, so JAX compiles each op once; the
    patterns of `MASKS` add other lengths)."""
    rng = np.random.default_rng(seed)
    answers = set()
    for _ in range(40):
        batch, length = 3, 11
        mask = np.zeros((batch, length), "int32")
        for row in mask:
            kind = rng.integers(4)
            if kind == 0:  # random holes
                row[:] = rng.random(length) < 0.6
            elif kind > 1:  # one run, anywhere (kind 1: empty)
                start = rng.integers(length)
                row[start : rng.integers(start, length) + 1] = 1
        want = bool(
            ops.convert_to_numpy(runs_contiguous(*shift_indices(mask), length))
        )
        got = mask_contiguous(mask * rng.integers(1, 5))  # any nonzero
        assert bool(ops.convert_to_numpy(got)) == want, mask
        answers.add(want)
    assert answers == {True, False}  # both kinds of mask were drawn
    for pattern, rows in MASKS.items():
        got = mask_contiguous(np.array(rows, "int32"))
        assert bool(ops.convert_to_numpy(got)) == (pattern != "interior")


def test_a_forward_pass_tests_contiguity_once(monkeypatch):
    """The backbone asks once a pass, not once a layer (on torch each
    answer is a device sync), and a decoding step never asks."""
    from keras_rwkv import RWKV6Backbone
    from keras_rwkv.models.rwkv6 import rwkv6_backbone
    from keras_rwkv.models.rwkv6 import rwkv6_block

    calls = []

    def counted(*args):
        calls.append(args[-1])
        return runs_contiguous(*args)

    for module in (rwkv6_backbone, rwkv6_block, rwkv6_token_shift):
        monkeypatch.setattr(module, "runs_contiguous", counted, raising=False)
    backbone = RWKV6Backbone(
        vocabulary_size=50, num_layers=3, hidden_dim=64, intermediate_dim=128
    )
    mask = np.array(MASKS["right"], "int32")
    ids = np.ones_like(mask)
    _, state = backbone.call_with_state(ids, mask)
    assert calls == [7]
    backbone.call_with_state(ids[:, :1], mask[:, :1], state)
    assert calls == [7]


@pytest.mark.parametrize("pattern", ["none", "right", "interior"])
def test_token_shift_gradients(pattern):
    if keras.config.backend() != "jax":
        pytest.skip("gradient check written with jax.grad")
    import jax
    import jax.numpy as jnp

    mask = np.array(MASKS[pattern], "int32")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 7, 5)).astype("float32")
    state = rng.standard_normal((3, 5)).astype("float32")
    g_prev = rng.standard_normal((3, 7, 5)).astype("float32")
    g_state = rng.standard_normal((3, 5)).astype("float32")

    def loss(x, state):
        prev_index, last_index = shift_indices(mask)
        previous, new_state = token_shift(x, state, prev_index, last_index)
        return jnp.sum(previous * g_prev) + jnp.sum(new_state * g_state)

    dx, ds = jax.jit(jax.grad(loss, (0, 1)))(x, state)
    _, _, source, last = reference(x, state, mask)
    want_dx, want_ds = reference_grads(x, state, source, last, g_prev, g_state)
    np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ds), want_ds, rtol=1e-6, atol=1e-6)


def test_contiguous_padding_runs_no_full_scatter():
    """The gradient of the general gather is a scatter-add with one update
    a token; it must sit only in the branch that interior pads take."""
    if keras.config.backend() != "jax":
        pytest.skip("jax only")
    import jax
    import jax.numpy as jnp

    def loss(x, state, mask):
        prev_index, last_index = shift_indices(mask)
        previous, new_state = token_shift(x, state, prev_index, last_index)
        return jnp.sum(previous) + jnp.sum(new_state)

    b, t, c = 2, 16, 8
    jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1)))(
        jnp.ones((b, t, c)), jnp.ones((b, c)), jnp.ones((b, t), "int32")
    )

    def scatters(jaxpr, in_cond):
        """(updates shape, inside a cond branch) of every scatter-add."""
        found = []
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scatter-add":
                found.append((eqn.invars[2].aval.shape, in_cond))
            for param in eqn.params.values():
                subs = param if isinstance(param, (list, tuple)) else [param]
                for sub in subs:
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        found += scatters(
                            inner, in_cond or eqn.primitive.name == "cond"
                        )
        return found

    per_token = [
        inside
        for shape, inside in scatters(jaxpr.jaxpr, False)
        if int(np.prod(shape)) >= b * t * c
    ]
    assert per_token == [True]


def test_decoding_step_has_no_branch():
    """One token (every decoding step): no `cond` in the traced step."""
    if keras.config.backend() != "jax":
        pytest.skip("jax only")
    import jax
    import jax.numpy as jnp

    def step(x, state, mask):
        prev_index, last_index = shift_indices(mask)
        return token_shift(x, state, prev_index, last_index)

    jaxpr = jax.make_jaxpr(step)(
        jnp.ones((2, 1, 8)), jnp.ones((2, 8)), jnp.ones((2, 1), "int32")
    )
    assert "cond" not in {e.primitive.name for e in jaxpr.jaxpr.eqns}
    jaxpr = jax.make_jaxpr(step)(
        jnp.ones((2, 3, 8)), jnp.ones((2, 8)), jnp.ones((2, 3), "int32")
    )
    assert "cond" in {e.primitive.name for e in jaxpr.jaxpr.eqns}
