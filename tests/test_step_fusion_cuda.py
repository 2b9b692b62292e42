"""The fused step kernels against their plain-JAX references (needs an
sm_90+ GPU).

Random inputs at the sizes of the 1.6B and the 7B and a small odd one,
per-channel vectors in bfloat16 and float32, a real token and a pad.
Tolerances: bfloat16 outputs within 1e-2 of the largest value (their
rounding); float32 `log_w` within 1e-3 (the decay LoRA summed in another
order, then exponentiated); the float32 state within 1e-5. A model step
on these kernels is checked in tests/test_matvec_cuda.py.
"""

import numpy as np
import pytest

from tests.reference import relative_error
from tests.test_matvec_cuda import sm90_or_skip


def _fused_or_skip():
    arch = sm90_or_skip()
    from keras_rwkv.ops.matvec import fused_step

    fused_step.load(arch)
    return fused_step


# (C, mix LoRA rank D, decay LoRA rank E)
SIZES = [(2048, 32, 64), (4096, 64, 128), (320, 8, 16)]


def _check(got, want, tol):
    assert got.shape == want.shape and got.dtype == want.dtype, got.dtype
    got, want = (np.asarray(a, np.float32) for a in (got, want))
    err = relative_error(got, want)
    assert err < tol, err


def _arrays(rng, vec_dtype, c, d, e):
    import jax.numpy as jnp

    def a(shape, scale=1.0, dtype=jnp.bfloat16):
        return jnp.asarray(rng.normal(size=shape) * scale, dtype)

    return dict(
        x=a((1, 1, c)),
        prev=a((1, 1, c)),
        maa_x=a((c,), 0.5, vec_dtype),
        maa=a((5, c), 0.5, vec_dtype),
        w1=a((c, 5 * d), 1 / np.sqrt(c)),
        w2=a((5, d, c), 1 / np.sqrt(d)),
        decay=jnp.asarray(rng.uniform(-6, 1, c), vec_dtype),
        dw1=a((c, e), 1 / np.sqrt(c)),
        dw2=a((e, c), 1 / np.sqrt(e)),
    )


@pytest.mark.parametrize("vec_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_kernels_match_the_references(size, vec_dtype):
    fused_step = _fused_or_skip()
    import jax.numpy as jnp

    c, d, e = size
    rng = np.random.default_rng(c + d)
    kern, ref = fused_step.fused, fused_step.reference
    w = _arrays(rng, vec_dtype, c, d, e)
    gamma = jnp.asarray(rng.uniform(0.5, 1.5, c), vec_dtype)
    beta = jnp.asarray(rng.normal(size=c) * 0.1, vec_dtype)
    delta = jnp.asarray(rng.normal(size=(1, 1, c)), jnp.bfloat16)

    for got, want in zip(
        kern.add_norm(w["x"], gamma, beta, 1e-5, delta),
        ref.add_norm(w["x"], gamma, beta, 1e-5, delta),
    ):
        _check(got, want, 1e-2)
    _check(
        kern.add_norm(w["x"], gamma, beta, 1e-5),
        ref.add_norm(w["x"], gamma, beta, 1e-5),
        1e-2,
    )

    h = c // 64
    state = jnp.asarray(rng.normal(size=(1, h, 64, 64)), jnp.float32)
    u = jnp.asarray(rng.normal(size=(h, 64)), vec_dtype)
    for mask in (np.ones((1, 1), np.int32), np.zeros((1, 1), bool)):
        args = list(w.values()) + [jnp.asarray(mask)]
        got, want = kern.mix(*args), ref.mix(*args)
        for g, r in zip(got[:4], want[:4]):
            _check(g, r, 1e-2)
        _check(got[4], want[4], 1e-3)
        r, k, v, g = got[:4]
        args = (r, k, v, g, want[4], u, state, gamma, beta, mask, 64e-5)
        y, s = kern.wkv_gate(*args)
        y_ref, s_ref = ref.wkv_gate(*args)
        _check(y, y_ref, 1e-2)
        _check(s, s_ref, 1e-5)
        if not mask.any():
            np.testing.assert_array_equal(np.asarray(s), np.asarray(state))
