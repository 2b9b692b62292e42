"""JAX binding of the CUDA WKV6 kernel through the XLA FFI.

`wkv6` is a `jax.custom_vjp` over two FFI calls. It works under `jit`,
with inputs sharded over batch and heads (each device runs the kernel on
its shard) and under `vmap` (folded into the batch); see
`jax_partition.py`.
"""

import ctypes

import jax
import jax.numpy as jnp
import numpy as np

from keras_rwkv.ops.wkv6.cuda import build
from keras_rwkv.ops.wkv6.cuda import jax_partition
from keras_rwkv.utils import settings

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


def _launch_attributes():
    # Forced launch choices (settings.wkv6_launch), read at trace time.
    launch = settings.wkv6_launch()
    return {name: np.int32(value) for name, value in launch.items()}


def _forward_call(r, k, v, log_w, u, s0):
    # Shapes are per shard here (see jax_partition).
    b, _, h, n = r.shape
    return jax.ffi.ffi_call(
        FORWARD_TARGET,
        (
            jax.ShapeDtypeStruct(r.shape, r.dtype),
            jax.ShapeDtypeStruct((b, h, n, n), jnp.float32),
        ),
    )(r, k, v, log_w, u, s0, **_launch_attributes())


def _backward_call(r, k, v, log_w, u, s0, gy, gs, s_final):
    b, _, h, n = r.shape
    seq = jax.ShapeDtypeStruct(r.shape, r.dtype)
    f32 = jax.ShapeDtypeStruct(r.shape, jnp.float32)
    return jax.ffi.ffi_call(
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
    )(r, k, v, log_w, u, s0, gy, gs, s_final, **_launch_attributes())


# Operand layouts: batch "b", time "t", heads "h", key "n", value "m".
_SEQ, _U, _STATE = "b t h n", "h n", "b h n m"
FORWARD_LAYOUTS = ([_SEQ] * 4 + [_U, _STATE], [_SEQ, _STATE])
# dr, dk, dv, P, Q (running sums for dlog_w) and du per batch row.
BACKWARD_LAYOUTS = (
    [_SEQ] * 4 + [_U, _STATE, _SEQ, _STATE, _STATE],
    [_SEQ] * 5 + ["b h n", _STATE],
)


def make_wkv6(forward_call, backward_call):
    """The differentiable, shardable WKV6 op over two per-shard calls.

    `wkv6` below uses the FFI kernels; tests pass stand-ins with the same
    contract to check the sharding and vmap rules without a GPU.

    Args:
        forward_call: `(r, k, v, log_w, u, s0) -> (y, s)`, `s0` `[B, H, N,
            N]`.
        backward_call: `(r, k, v, log_w, u, s0, gy, gs, s) -> (dr, dk, dv,
            P, Q, du, ds0)` with `dlog_w = Q + P[:, -1:] - P` and `du` per
            batch row.

    Returns:
        `wkv6(r, k, v, log_w, u, initial_state) -> (y, final_state)`,
        inputs as `keras_rwkv.ops.wkv6.cuda.normalize` gives them.
    """
    forward_op = jax_partition.batch_head_op(forward_call, *FORWARD_LAYOUTS)
    backward_op = jax_partition.batch_head_op(backward_call, *BACKWARD_LAYOUTS)

    @jax.custom_vjp
    def wkv(r, k, v, log_w, u, s0):
        return forward_op(r, k, v, log_w, u, s0)

    def wkv_fwd(r, k, v, log_w, u, s0):
        y, s = forward_op(r, k, v, log_w, u, s0)
        return (y, s), (r, k, v, log_w, u, s0, s)

    def wkv_bwd(res, cotangents):
        r, k, v, log_w, u, s0, s_final = res
        gy, gs = cotangents
        dr, dk, dv, p, q, du, ds0 = backward_op(
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
        return dr, dk, dv, dlog_w, jnp.sum(du, axis=0), ds0

    wkv.defvjp(wkv_fwd, wkv_bwd)

    def wkv6(r, k, v, log_w, u, initial_state):
        # Inputs as `keras_rwkv.ops.wkv6.cuda.normalize` leaves them.
        b, _, h, n = r.shape
        # One state per row, so the state shards with the batch; the
        # broadcast's own gradient sums a shared state's rows.
        s0 = jnp.broadcast_to(initial_state, (b, h, n, n))
        return wkv(r, k, v, log_w, u, s0)

    return wkv6


_wkv6 = make_wkv6(_forward_call, _backward_call)


def wkv6(r, k, v, log_w, u, initial_state):
    """The WKV6 op on JAX arrays, inputs as `cuda.normalize` gives them
    (dtypes and shapes there); returns `(y, final_state)`."""
    return _wkv6(r, k, v, log_w, u, initial_state)
