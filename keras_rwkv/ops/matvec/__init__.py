"""Matrix-vector products of a decoding step, on a CUDA kernel of our own.

`step_matvec()` returns the op (`matvec(kind, operands) -> [y, ...]`, see
`jax_binding.py`) where it runs, or `None`: JAX on an NVIDIA GPU of compute
capability 9.0 or newer (the kernel adds its split sums across a
thread-block cluster), with nvcc to build it once. `KERAS_RWKV_STEP_KERNEL`
(`keras_rwkv.utils.settings`) turns it off (`xla`) or makes a failure to
load it an error (`cuda`). `models/rwkv6/rwkv6_projection.py` decides which
projections take it.
"""

import functools
import logging

import keras

from keras_rwkv.utils import settings

logger = logging.getLogger("keras_rwkv")


class StepKernelUnavailable(RuntimeError):
    """`KERAS_RWKV_STEP_KERNEL=cuda` was set and the kernel cannot run."""


@functools.cache
def _load():
    """`(op, None)` or `(None, reason)`, decided once per process."""
    if keras.config.backend() != "jax":
        return None, f"the Keras backend is {keras.config.backend()!r}"
    try:
        import jax

        if jax.default_backend() != "gpu":
            return None, f"JAX runs on {jax.default_backend()!r}"
        arch = jax.devices()[0].compute_capability.replace(".", "")
        if int(arch) < 90:
            return None, f"compute capability {arch} (needs 9.0 or newer)"
        from keras_rwkv.ops.matvec import jax_binding

        jax_binding.load(arch)
        return jax_binding.matvec, None
    except Exception as e:  # noqa: BLE001 - falls back to XLA's matmul
        return None, f"{type(e).__name__}: {e}"


def step_matvec():
    """The step kernel's op, or `None` where XLA's matmul runs instead."""
    choice = settings.step_kernel()
    if choice == "xla":
        return None
    op, reason = _load()
    if op is None:
        if choice == "cuda":
            raise StepKernelUnavailable(
                f"KERAS_RWKV_STEP_KERNEL=cuda, but the step kernel cannot "
                f"run: {reason}. Unset it to fall back to XLA."
            )
        _note_once(reason)
    return op


@functools.cache
def _note_once(reason):
    logger.info("keras_rwkv: decoding-step kernel not used: %s", reason)
