"""JAX binding of the CUDA WKV6 kernel through the XLA FFI.

`wkv6` is a `jax.custom_vjp` over two FFI calls; it works under `jit`,
and under `vmap` by looping (`vmap_method="sequential"`: a vmapped batch
of independent sequences is better folded into B by the caller).
"""

import ctypes

import jax
import jax.numpy as jnp

from keras_rwkv.ops.wkv6.cuda import build

FORWARD_TARGET = "keras_rwkv_wkv6_forward"
BACKWARD_TARGET = "keras_rwkv_wkv6_backward"
_state = {}


def _framework_version():
    import jaxlib

    return f"jax{jax.__version__}-jaxlib{jaxlib.__version__}"


def load(arch):
    """Builds (once) and registers the FFI targets.

    Args:
        arch: compute capability without the dot, e.g. `"90"`.
    """
    if _state:
        return
    path = build.build(
        "jax", arch, _framework_version(), include_dirs=[jax.ffi.include_dir()]
    )
    lib = ctypes.cdll.LoadLibrary(str(path))
    for name, symbol in (
        (FORWARD_TARGET, lib.KerasRwkvWkv6Forward),
        (BACKWARD_TARGET, lib.KerasRwkvWkv6Backward),
    ):
        jax.ffi.register_ffi_target(
            name, jax.ffi.pycapsule(symbol), platform="CUDA"
        )
    _state.update(lib=lib, arch=arch, path=path)


def describe():
    """One line saying what runs."""
    return f"CUDA WKV6 kernel via the XLA FFI (sm_{_state['arch']})"


def _forward_call(r, k, v, log_w, u, s0):
    b, _, h, n = r.shape
    return jax.ffi.ffi_call(
        FORWARD_TARGET,
        (
            jax.ShapeDtypeStruct(r.shape, r.dtype),
            jax.ShapeDtypeStruct((b, h, n, n), jnp.float32),
        ),
        vmap_method="sequential",
    )(r, k, v, log_w, u, s0)


@jax.custom_vjp
def _wkv(r, k, v, log_w, u, s0):
    return _forward_call(r, k, v, log_w, u, s0)


def _wkv_fwd(r, k, v, log_w, u, s0):
    y, s = _forward_call(r, k, v, log_w, u, s0)
    return (y, s), (r, k, v, log_w, u, s0, s)


def _wkv_bwd(res, cotangents):
    r, k, v, log_w, u, s0, s_final = res
    gy, gs = cotangents
    b, t, h, n = r.shape
    seq = jax.ShapeDtypeStruct(r.shape, r.dtype)
    f32 = jax.ShapeDtypeStruct(r.shape, jnp.float32)
    dr, dk, dv, p, q, du, ds0 = jax.ffi.ffi_call(
        BACKWARD_TARGET,
        (
            seq,
            seq,
            seq,
            f32,
            f32,
            jax.ShapeDtypeStruct((b, h, n), jnp.float32),
            jax.ShapeDtypeStruct((b, h, n, n), jnp.float32),
        ),
        vmap_method="sequential",
    )(
        r,
        k,
        v,
        log_w,
        u,
        s0,
        gy.astype(r.dtype),
        gs.astype(jnp.float32),
        s_final,
    )
    # dlog_w_t = sum_{m>t} r.dr' - sum_{m>=t} k.dk' + sum_j gS.S_T; the
    # kernel returns the running sums (see wkv6_kernels.cuh).
    dlog_w = q + p[:, -1:] - p
    if s0.shape[0] != b:
        ds0 = jnp.sum(ds0, axis=0, keepdims=True)
    return dr, dk, dv, dlog_w, jnp.sum(du, axis=0), ds0


_wkv.defvjp(_wkv_fwd, _wkv_bwd)


def wkv6(r, k, v, log_w, u, initial_state=None):
    """The WKV6 op on JAX arrays (see `keras_rwkv.ops.wkv6`).

    Args:
        r, k, v, log_w: `[B, T, H, N]`.
        u: `[H, N]`.
        initial_state: `[B or 1, H, N, N]` or `None`.

    Returns:
        `(y, final_state)`: `y` in `r`'s dtype, the state float32.
    """
    out_dtype = r.dtype
    r, k, v = (jnp.asarray(x) for x in (r, k, v))
    dtype = (
        jnp.bfloat16
        if all(x.dtype == jnp.bfloat16 for x in (r, k, v))
        else jnp.float32
    )
    r, k, v = (x.astype(dtype) for x in (r, k, v))
    log_w = jnp.asarray(log_w, jnp.float32)
    u = jnp.asarray(u, jnp.float32)
    _, _, h, n = r.shape
    if initial_state is None:
        s0 = jnp.zeros((1, h, n, n), jnp.float32)
    else:
        s0 = jnp.asarray(initial_state, jnp.float32)
    y, s = _wkv(r, k, v, log_w, u, s0)
    return y.astype(out_dtype), s
