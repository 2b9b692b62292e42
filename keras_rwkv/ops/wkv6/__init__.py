"""The WKV6 op: one entry point, several implementations.

`y, final_state = wkv6(r, k, v, log_w, u, initial_state=None, kernel="auto")`

- `r, k, v, log_w`: `[B, T, H, N]`; `log_w = -exp(w_raw) <= 0` (the log of
  the per-channel decay, float32 preferred).
- `u`: `[H, N]` (the "bonus" of the current token, `time_faaaa`).
- `initial_state`: `[B or 1, H, N, N]` float32 in (key, value) order, or
  `None` for zeros.
- Returns `y` in the dtype of `r` and `final_state` float32 `[B, H, N, N]`.

Differentiable in every input, `initial_state` included.

`kernel="auto"` runs the CUDA kernel (`cuda/`, built with nvcc on first
use) on the jax and torch backends when a GPU and nvcc (or a cached build)
are there, and the Python path otherwise; it logs once which it chose
(INFO on the "keras_rwkv" logger; a warning where a GPU goes unused).
`KERAS_RWKV_WKV_KERNEL=python|cuda` forces either. Decoding (T = 1) stays
on the Python step under "auto": XLA fuses it into the surrounding layer.
At small batch the CUDA path also splits the sequence into time segments
run as extra rows (`time_split.py`; `KERAS_RWKV_WKV6_SEGMENTS` forces the
count).
"""

import logging
import os

import keras
from keras import ops

from keras_rwkv.ops.wkv6 import cuda
from keras_rwkv.ops.wkv6.cuda import CudaKernelUnavailable
from keras_rwkv.ops.wkv6.python import DEFAULT_CHUNK_SIZE
from keras_rwkv.ops.wkv6.python import full_state
from keras_rwkv.ops.wkv6.python import wkv6_chunked
from keras_rwkv.ops.wkv6.python import wkv6_step
from keras_rwkv.utils import settings

KERNELS = ("auto", "python", "cuda")
KERNEL_ENV_VAR = settings.WKV_KERNEL_ENV_VAR
# Head sizes the CUDA kernel is instantiated for (wkv6_kernels.cuh).
CUDA_HEAD_SIZES = (8, 16, 32, 64, 128)

logger = logging.getLogger("keras_rwkv")
_announced = set()


def gpu_present():
    """Whether this machine has an NVIDIA GPU (whatever the frameworks
    see): where there is none, the Python path is no news."""
    gpus = "/proc/driver/nvidia/gpus"
    return os.path.exists("/dev/nvidia0") or (
        os.path.isdir(gpus) and bool(os.listdir(gpus))
    )


def _announce(choice, detail):
    # Once per (choice, reason): a model calls the op in every layer. The
    # details go to the "keras_rwkv" logger at INFO (`--verbose`); a
    # warning only where a GPU sits unused.
    if (choice, detail) in _announced:
        return
    _announced.add((choice, detail))
    logger.info("keras_rwkv: WKV6 kernel %r: %s", choice, detail)
    if choice == "python" and gpu_present():
        logger.warning(
            "keras_rwkv: this machine has a GPU, but the CUDA WKV kernel is "
            "not used (the Python path is slower). Why: --verbose, or "
            "logging.getLogger('keras_rwkv').setLevel('INFO')."
        )


def resolve_kernel(kernel="auto"):
    """Returns the implementation `kernel` stands for: "python" or "cuda".

    `"auto"` honours the `KERAS_RWKV_WKV_KERNEL` environment variable and
    otherwise picks CUDA when it can be built and run on this backend.

    Args:
        kernel: `"auto"`, `"python"` or `"cuda"`.

    Returns:
        `"python"` or `"cuda"`.

    Raises:
        ValueError: an unknown kernel name.
        CudaKernelUnavailable: `"cuda"` was asked for and cannot run
            (no GPU, no nvcc, TensorFlow backend, ...), with the reason.
    """
    if kernel not in KERNELS:
        raise ValueError(
            f"Unknown WKV kernel {kernel!r}. Use one of {', '.join(KERNELS)}."
        )
    if kernel == "auto":
        forced = settings.wkv_kernel_override(KERNELS)
        if forced and forced != "auto":
            return resolve_kernel(forced)
        ok, detail = cuda.availability(keras.config.backend())
        choice = "cuda" if ok else "python"
        _announce(choice, detail if ok else f"CUDA not used: {detail}")
        return choice
    if kernel == "cuda":
        cuda.require(keras.config.backend())
    return kernel


def _on_gpu(x):
    # torch tensors may live on the CPU even when a GPU is there.
    device = getattr(x, "device", None)
    return getattr(device, "type", "cuda") == "cuda"


def wkv6(
    r,
    k,
    v,
    log_w,
    u,
    initial_state=None,
    kernel="auto",
    chunk_size=DEFAULT_CHUNK_SIZE,
    resolved=None,
):
    """Runs the WKV6 recurrence over a sequence. See the module docstring.

    Args:
        r, k, v, log_w: tensors `[B, T, H, N]`.
        u: tensor `[H, N]`.
        initial_state: optional float32 `[B or 1, H, N, N]`.
        kernel: `"auto"`, `"python"` or `"cuda"`.
        chunk_size: chunk length of the Python chunked form.
        resolved: `resolve_kernel(kernel)` when the caller already has it
            (a layer resolves its kernel once, not at every call).

    Returns:
        `(y, final_state)`.
    """
    choice = resolved or resolve_kernel(kernel)
    if len(r.shape) != 4:
        raise ValueError(
            f"wkv6 expects r, k, v, log_w of shape [B, T, H, N]; got r "
            f"with shape {tuple(r.shape)}."
        )
    if choice == "cuda" and (kernel == "cuda" or r.shape[1] != 1):
        r, k, v, log_w, u = (
            ops.convert_to_tensor(x) for x in (r, k, v, log_w, u)
        )
        if initial_state is not None:
            initial_state = ops.convert_to_tensor(initial_state)
        problem = None
        if r.shape[3] not in CUDA_HEAD_SIZES:
            problem = (
                f"head size {r.shape[3]} (the CUDA kernel supports "
                f"{CUDA_HEAD_SIZES})"
            )
        elif keras.config.backend() == "torch" and not _on_gpu(r):
            problem = f"inputs on {r.device}, not a CUDA device"
        if problem is None:
            return cuda.wkv6_cuda(r, k, v, log_w, u, initial_state)
        if kernel == "cuda":
            raise CudaKernelUnavailable(f"kernel='cuda' cannot run: {problem}.")
    out_dtype = r.dtype
    r, k, v, log_w, u = (ops.cast(x, "float32") for x in (r, k, v, log_w, u))
    state = full_state(initial_state, ops.shape(r)[0], *r.shape[2:])
    if r.shape[1] == 1:
        y, final_state = wkv6_step(r, k, v, log_w, u, state)
    else:
        y, final_state = wkv6_chunked(
            r, k, v, log_w, u, state, chunk_size=chunk_size
        )
    return ops.cast(y, out_dtype), final_state
