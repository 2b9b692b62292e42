"""JAX binding of the decoding-step matrix-vector kernel (XLA FFI).

`make_matvec(call)` wraps a per-call function in a `jax.custom_vjp`, so a
step stays differentiable; `matvec` is it over the FFI kernel. Tests pass a
stand-in `call` with the same contract to check the gradients on the CPU.
"""

import ctypes
import functools

import jax
import jax.numpy as jnp
import numpy as np

from keras_rwkv.ops.wkv6.cuda import build

TARGET = "keras_rwkv_matvec"
SYMBOL = "KerasRwkvMatvec"
# Operands per product for each kind (see matvec_jax_ffi.cu).
BF16, INT8, INT8_ROWS = 0, 1, 2
GROUP = {BF16: 2, INT8: 3, INT8_ROWS: 4}
_state = {}


def build_and_register(flavor, arch, targets):
    """Builds (once per source, see `build.py`) one flavour's library and
    registers its FFI `targets` (`{target name: symbol}`) with XLA.

    Returns:
        `(library, path)`.
    """
    import jaxlib

    version = f"jax{jax.__version__}-jaxlib{jaxlib.__version__}"
    path = build.build(
        flavor, arch, version, include_dirs=[jax.ffi.include_dir()]
    )
    lib = ctypes.cdll.LoadLibrary(str(path))
    for target, symbol in targets.items():
        jax.ffi.register_ffi_target(
            target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="CUDA"
        )
    return lib, path


def load(arch):
    """Builds (once) and registers the FFI target.

    Args:
        arch: compute capability without the dot, e.g. `"90"`.
    """
    if _state:
        return
    lib, path = build_and_register("matvec_jax", arch, {TARGET: SYMBOL})
    _state.update(lib=lib, arch=arch, path=path)


def ffi_call(kind, operands):
    """The kernel: one `[M, N]` bfloat16 result per product."""
    group = GROUP[kind]
    shapes = [
        jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.bfloat16)
        for x, w in zip(operands[::group], operands[1::group])
    ]
    return jax.ffi.ffi_call(TARGET, shapes)(*operands, kind=np.int32(kind))


def reference_call(kind, operands):
    """The same contract in plain JAX (float32 sums), for tests."""
    group = GROUP[kind]
    out = []
    for i in range(0, len(operands), group):
        x, w, *scales = operands[i : i + group]
        y = jnp.matmul(x.astype(jnp.float32), w.astype(jnp.float32))
        if scales:
            scale = scales[0].astype(jnp.float32)[None, :]
            if len(scales) > 1:
                scale = scale * scales[1].astype(jnp.float32)[:, None]
            y = y / scale
        out.append(y.astype(jnp.bfloat16))
    return out


def _zero_cotangent(a):
    if jnp.issubdtype(a.dtype, jnp.integer):
        return np.zeros(a.shape, jax.dtypes.float0)
    return jnp.zeros_like(a)


def make_matvec(call):
    """`matvec(kind, operands) -> [y, ...]`, differentiable, over `call`.

    Gradients: `dx = dy @ W^T` with an int8 `W` read as `W / col_scale`
    (Keras's int8 `Dense` does the same, passing the gradient straight
    through its quantized input); `dW = x^T @ dy` for a bfloat16 `W`; none
    for int8 weights or scales.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def product(kind, *operands):
        return tuple(call(kind, list(operands)))

    def forward(kind, *operands):
        return product(kind, *operands), operands

    def backward(kind, operands, cotangents):
        group = GROUP[kind]
        grads = []
        for i, dy in enumerate(cotangents):
            x, w, *scales = operands[group * i : group * (i + 1)]
            dy = dy.astype(jnp.float32)
            w32 = w.astype(jnp.float32)
            if scales:
                w32 = w32 / scales[0].astype(jnp.float32)[None, :]
            grads.append(jnp.matmul(dy, w32.T).astype(x.dtype))
            if kind == BF16:
                dw = jnp.matmul(x.astype(jnp.float32).T, dy)
                grads.append(dw.astype(w.dtype))
            else:
                grads.append(_zero_cotangent(w))
            grads.extend(_zero_cotangent(s) for s in scales)
        return tuple(grads)

    product.defvjp(forward, backward)

    def matvec(kind, operands):
        return list(product(kind, *operands))

    return matvec


matvec = make_matvec(ffi_call)
