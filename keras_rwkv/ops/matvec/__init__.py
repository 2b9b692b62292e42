"""A decoding step's CUDA kernels of our own: matrix-vector products and
the fused pieces between them.

`step_matvec()` returns the products' op (`matvec(kind, operands) -> [y,
...]`, see `jax_binding.py`) and `step_fused()` the fused pieces
(`fused_step.py`) where they run, or `None`: JAX on an NVIDIA GPU of compute
capability 9.0 or newer (the kernel adds its split sums across a
thread-block cluster), with nvcc to build it once. `KERAS_RWKV_STEP_KERNEL`
(`keras_rwkv.utils.settings`) turns it off (`xla`) or makes a failure to
load it an error (`cuda`). `models/rwkv6/rwkv6_projection.py` decides which
projections take it, `models/rwkv6/rwkv6_step_fusion.py` which steps take
the fused pieces.
"""

import functools
import logging

import keras

from keras_rwkv.utils import settings

logger = logging.getLogger("keras_rwkv")


class StepKernelUnavailable(RuntimeError):
    """`KERAS_RWKV_STEP_KERNEL=cuda` was set and the kernel cannot run."""


@functools.cache
def _load(part):
    """`(op, None)` or `(None, reason)` for `"matvec"` (the products) or
    `"fused"` (the `fused_step` module), decided once per process."""
    if keras.config.backend() != "jax":
        return None, f"the Keras backend is {keras.config.backend()!r}"
    try:
        import jax

        if jax.default_backend() != "gpu":
            return None, f"JAX runs on {jax.default_backend()!r}"
        arch = jax.devices()[0].compute_capability.replace(".", "")
        if int(arch) < 90:
            return None, f"compute capability {arch} (needs 9.0 or newer)"
        if part == "fused":
            from keras_rwkv.ops.matvec import fused_step

            fused_step.load(arch)
            return fused_step.fused, None
        from keras_rwkv.ops.matvec import jax_binding

        jax_binding.load(arch)
        return jax_binding.matvec, None
    except Exception as e:  # noqa: BLE001 - falls back to XLA
        return None, f"{type(e).__name__}: {e}"


def _resolve(part):
    choice = settings.step_kernel()
    if choice == "xla":
        return None
    op, reason = _load(part)
    if op is None:
        if choice == "cuda":
            raise StepKernelUnavailable(
                f"KERAS_RWKV_STEP_KERNEL=cuda, but the step kernel cannot "
                f"run: {reason}. Unset it to fall back to XLA."
            )
        _note_once(reason)
    return op


def step_matvec():
    """The step kernel's op, or `None` where XLA's matmul runs instead."""
    return _resolve("matvec")


def step_fused():
    """The fused pieces of a batch-1 step (`fused_step.fused`: norms,
    token-shift mix, WKV step and gate), or `None` where XLA runs them."""
    return _resolve("fused")


@functools.cache
def _note_once(reason):
    logger.info("keras_rwkv: decoding-step kernel not used: %s", reason)
