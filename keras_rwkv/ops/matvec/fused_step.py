"""JAX binding of the fused pieces of a batch-1 decoding step (XLA FFI).

Three ops (`cuda/step_kernels.cuh` says why and how):

- `add_norm(x, gamma, beta, eps, delta=None)`: `LayerNorm(x + delta)`,
  and `x + delta` when a delta is given;
- `mix(x, prev, maa_x, maa, w1, w2, decay, dw1, dw2, mask)`: the time
  mix's data-dependent token shift and decay, `(x_k, x_v, x_r, x_g,
  log_w)`;
- `wkv_gate(r, k, v, g, log_w, u, state, gamma, beta, mask, eps)`: the
  WKV step, group norm and SiLU gate, `(y, new_state)`.

Each has a plain-JAX reference with the same contract (float32 sums from
the same inputs): the tests hold the kernels to it, and the ops'
gradients are the references' (a step is rarely differentiated, but it
must be differentiable).
"""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np

from keras_rwkv.ops.matvec.jax_binding import build_and_register

TARGETS = {
    "add_norm": "KerasRwkvAddNorm",
    "mix": "KerasRwkvMix",
    "wkv_gate": "KerasRwkvWkvGate",
}
HEAD_SIZE = 64
_state = {}


def load(arch):
    """Builds (once) and registers the FFI targets.

    Args:
        arch: compute capability without the dot, e.g. `"90"`.
    """
    if _state:
        return
    targets = {t: t for t in TARGETS.values()}
    lib, path = build_and_register("step_jax", arch, targets)
    _state.update(lib=lib, arch=arch, path=path)


def _f32(a):
    return jnp.asarray(a).astype(jnp.float32)


# ------------------------------------------------------------ references --


def add_norm_reference(x, gamma, beta, eps, delta=None):
    if delta is not None:
        x = (_f32(x) + _f32(delta)).astype(jnp.bfloat16)
    x32 = _f32(x)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * _f32(gamma) + _f32(beta)
    y = y.astype(jnp.bfloat16)
    return y if delta is None else (y, x)


def mix_reference(x, prev, maa_x, maa, w1, w2, decay, dw1, dw2, mask):
    x32 = _f32(x)
    sx = _f32(prev) - x32
    lora = jnp.tanh((x32 + sx * _f32(maa_x)) @ _f32(w1))
    lora = lora.reshape(lora.shape[:-1] + w2.shape[:2])
    lora = jnp.einsum("...md,mdc->...mc", lora, _f32(w2))
    mixed = x32[..., None, :] + sx[..., None, :] * (_f32(maa) + lora)
    decay_lora = jnp.tanh(mixed[..., 0, :] @ _f32(dw1)) @ _f32(dw2)
    log_w = -jnp.exp(_f32(decay) + decay_lora) * _f32(mask)[..., None]
    outs = tuple(mixed[..., m, :].astype(jnp.bfloat16) for m in range(1, 5))
    return outs + (log_w,)


def wkv_gate_reference(r, k, v, g, log_w, u, state, gamma, beta, mask, eps):
    shape = r.shape
    heads = shape[-1] // HEAD_SIZE

    def split(a):
        return _f32(a).reshape((-1, heads, HEAD_SIZE))

    r3, v3, w3 = split(r), split(v), jnp.exp(split(log_w))
    k3 = split(k) * _f32(mask).reshape((-1, 1, 1))
    u2 = _f32(u).reshape((heads, HEAD_SIZE))
    s = _f32(state)
    y = jnp.einsum("bhi,bhij->bhj", r3, s)
    y = y + jnp.sum(r3 * u2 * k3, axis=-1, keepdims=True) * v3
    new_state = w3[..., None] * s + k3[..., None] * v3[..., None, :]
    mean = jnp.mean(y, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(y - mean), axis=-1, keepdims=True)
    y = (y - mean) * jax.lax.rsqrt(var + eps)
    y = y.reshape(shape) * _f32(gamma) + _f32(beta)
    out = (y * jax.nn.silu(_f32(g))).astype(jnp.bfloat16)
    return out, new_state


# ------------------------------------------------------------------- ops --


def _with_reference_grad(call, reference):
    """`call` whose gradient is `reference`'s; keyword arguments are
    static (not arrays)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def op(statics, *operands):
        return call(*operands, **dict(statics))

    def forward(statics, *operands):
        return op(statics, *operands), operands

    def backward(statics, operands, cotangent):
        def ref(*a):
            return reference(*a, **dict(statics))

        return jax.vjp(ref, *operands)[1](cotangent)

    op.defvjp(forward, backward)

    def wrapped(*operands, **kwargs):
        return op(tuple(sorted(kwargs.items())), *operands)

    return wrapped


def _like(a, dtype=None):
    return jax.ShapeDtypeStruct(a.shape, dtype or a.dtype)


def _add_norm_call(x, gamma, beta, *delta, eps):
    outs = [_like(x)] * (1 + len(delta))
    found = jax.ffi.ffi_call(TARGETS["add_norm"], outs)(
        x,
        gamma,
        beta,
        *delta,
        eps=np.float32(eps),
        with_delta=np.int32(len(delta)),
    )
    return tuple(found) if delta else found[0]


def _add_norm_reference(x, gamma, beta, *delta, eps):
    return add_norm_reference(x, gamma, beta, eps, *delta)


def _mix_call(*operands):
    outs = [_like(operands[0])] * 4 + [_like(operands[0], jnp.float32)]
    return tuple(jax.ffi.ffi_call(TARGETS["mix"], outs)(*operands))


def _wkv_gate_call(*operands, eps):
    r, state = operands[0], operands[6]
    outs = [_like(r), _like(state)]
    # The state is updated in place: no copy of it per layer and step.
    return tuple(
        jax.ffi.ffi_call(
            TARGETS["wkv_gate"], outs, input_output_aliases={6: 1}
        )(*operands, eps=np.float32(eps))
    )


def make_fused(add_norm_call, mix_call, wkv_gate_call):
    """The three ops over per-call functions of the kernels' contract
    (tests pass the references), each with the references' gradient.

    Returns:
        A namespace with `add_norm`, `mix` and `wkv_gate`.
    """
    add_norm_op = _with_reference_grad(add_norm_call, _add_norm_reference)
    mix_op = _with_reference_grad(mix_call, mix_reference)
    wkv_gate_op = _with_reference_grad(wkv_gate_call, wkv_gate_reference)

    def add_norm(x, gamma, beta, eps, delta=None):
        """`LayerNorm(x)` of a batch-1 step `x` (`[1, 1, C]` bfloat16),
        or `(LayerNorm(x + delta), x + delta)` with a `delta`."""
        extra = () if delta is None else (delta,)
        return add_norm_op(x, gamma, beta, *extra, eps=float(eps))

    def wkv_gate(r, k, v, g, log_w, u, state, gamma, beta, mask, eps):
        """`(group_norm(wkv) * silu(g), new_state)` for one batch-1
        step."""
        return wkv_gate_op(
            r, k, v, g, log_w, u, state, gamma, beta, mask, eps=float(eps)
        )

    return types.SimpleNamespace(
        add_norm=add_norm, mix=mix_op, wkv_gate=wkv_gate
    )


# The kernels, and the references behind the same interface (for tests).
fused = make_fused(_add_norm_call, _mix_call, _wkv_gate_call)
reference = make_fused(_add_norm_reference, mix_reference, wkv_gate_reference)
