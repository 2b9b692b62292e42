"""CUDA WKV6 kernels behind the `wkv6` op, for the JAX and torch backends.

The kernels (`wkv6_kernels.cuh`) are built with nvcc on first use (see
`build.py`) into a per-user cache; JAX calls them through the XLA FFI
(`jax_binding.py`), torch through `torch.library` custom ops
(`torch_binding.py`). Nothing here imports jax or torch until a kernel is
asked for, so the package works without them, without nvcc and without a
GPU.
"""

import functools

import keras
from keras import ops

from keras_rwkv.ops.wkv6 import time_split
from keras_rwkv.ops.wkv6.cuda.build import CudaKernelUnavailable

__all__ = [
    "CudaKernelUnavailable",
    "availability",
    "normalize",
    "require",
    "wkv6_cuda",
]


def _gpu_arch(backend):
    """Compute capability of the first GPU the backend sees, e.g. "90"."""
    if backend == "jax":
        import jax

        try:
            devices = jax.devices("gpu")
        except RuntimeError as e:
            raise CudaKernelUnavailable(
                "The CUDA WKV kernel needs a CUDA GPU, and JAX sees none "
                f"({e}). Install jax with CUDA support, or use "
                "kernel='python' (KERAS_RWKV_WKV_KERNEL=python)."
            ) from None
        if jax.default_backend() != "gpu":
            raise CudaKernelUnavailable(
                "The CUDA WKV kernel needs JAX's default backend to be the "
                f"GPU (it is {jax.default_backend()!r})."
            )
        return devices[0].compute_capability.replace(".", "")
    if backend == "torch":
        import torch

        if not torch.cuda.is_available():
            raise CudaKernelUnavailable(
                "The CUDA WKV kernel needs a CUDA GPU, and torch sees none "
                "(torch.cuda.is_available() is False). Use kernel='python' "
                "(KERAS_RWKV_WKV_KERNEL=python)."
            )
        major, minor = torch.cuda.get_device_capability()
        return f"{major}{minor}"
    raise CudaKernelUnavailable(
        f"The CUDA WKV kernel has bindings for the jax and torch backends "
        f"only; the Keras backend is {backend!r}. Use kernel='python'."
    )


@functools.cache
def _load(backend):
    """The loaded binding module for `backend`, or the reason it is not."""
    try:
        arch = _gpu_arch(backend)
        if backend == "jax":
            from keras_rwkv.ops.wkv6.cuda import jax_binding as binding
        else:
            from keras_rwkv.ops.wkv6.cuda import torch_binding as binding
        binding.load(arch)
        return binding, None
    except CudaKernelUnavailable as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001 - "auto" must fall back, not fail
        return None, (
            f"The CUDA WKV kernel could not be loaded: {type(e).__name__}: {e}"
        )


def availability(backend=None):
    """Whether the CUDA kernel can run on `backend`, building it if needed.

    Args:
        backend: Keras backend name; defaults to the current one.

    Returns:
        `(True, description)` or `(False, reason)`.
    """
    backend = backend or keras.config.backend()
    binding, reason = _load(backend)
    if binding is None:
        return False, reason
    return True, binding.describe()


def require(backend=None):
    """Returns the binding module for `backend`.

    Args:
        backend: Keras backend name; defaults to the current one.

    Returns:
        The binding module (`jax_binding` or `torch_binding`).

    Raises:
        CudaKernelUnavailable: with the reason, when it cannot run.
    """
    backend = backend or keras.config.backend()
    binding, reason = _load(backend)
    if binding is None:
        raise CudaKernelUnavailable(reason)
    return binding


def normalize(r, k, v, log_w, u, initial_state=None):
    """The kernels' input contract, met once for both bindings: `r, k, v`
    all bfloat16 (when all three are) or else all float32; `log_w`, `u`
    and the state float32; a state always (zeros `[1, H, N, N]` for
    none)."""
    low = all(
        keras.backend.standardize_dtype(x.dtype) == "bfloat16"
        for x in (r, k, v)
    )
    dtype = "bfloat16" if low else "float32"
    r, k, v = (ops.cast(x, dtype) for x in (r, k, v))
    log_w, u = ops.cast(log_w, "float32"), ops.cast(u, "float32")
    if initial_state is None:
        _, _, h, n = r.shape
        initial_state = ops.zeros((1, h, n, n), "float32")
    return r, k, v, log_w, u, ops.cast(initial_state, "float32")


def wkv6_cuda(r, k, v, log_w, u, initial_state=None):
    """Runs the WKV6 op with the CUDA kernel of the current backend.

    Args:
        r, k, v, log_w: `[B, T, H, N]` backend tensors on the GPU.
        u: `[H, N]`.
        initial_state: `[B or 1, H, N, N]` or `None`.

    At small batch the sequence is also split into time segments run as
    extra rows (`time_split.py`), so that the GPU has enough independent
    chains to work on.

    Returns:
        `(y, final_state)`: `y` in `r`'s dtype, the state in float32.
    """
    batch, seq_len, num_heads, _ = r.shape
    segments = 1
    if batch is not None and seq_len is not None:
        segments = time_split.segment_count(batch, seq_len, num_heads)
    out_dtype = r.dtype
    y, state = time_split.split_over_time(
        require().wkv6, *normalize(r, k, v, log_w, u, initial_state), segments
    )
    return ops.cast(y, out_dtype), state
