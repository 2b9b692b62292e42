"""The WKV6 op: one entry point, several implementations.

`y, final_state = wkv6(r, k, v, log_w, u, initial_state=None, kernel="auto")`

- `r, k, v, log_w`: `[B, T, H, N]`; `log_w = -exp(w_raw) <= 0` (the log of
  the per-channel decay, float32 preferred).
- `u`: `[H, N]` (the "bonus" of the current token, `time_faaaa`).
- `initial_state`: `[B or 1, H, N, N]` float32 in (key, value) order, or
  `None` for zeros.
- Returns `y` in the dtype of `r` and `final_state` float32 `[B, H, N, N]`.

Differentiable in every input, `initial_state` included.
"""

import os

from keras import ops

from keras_rwkv.ops.wkv6.python import DEFAULT_CHUNK_SIZE
from keras_rwkv.ops.wkv6.python import wkv6_chunked
from keras_rwkv.ops.wkv6.python import wkv6_step

KERNELS = ("auto", "python", "cuda")
KERNEL_ENV_VAR = "KERAS_RWKV_WKV_KERNEL"


def resolve_kernel(kernel="auto"):
    """Returns the implementation `kernel` stands for: "python" or "cuda".

    `"auto"` honours the `KERAS_RWKV_WKV_KERNEL` environment variable and
    otherwise picks the best implementation available.
    """
    if kernel not in KERNELS:
        raise ValueError(
            f"Unknown WKV kernel {kernel!r}. Use one of {', '.join(KERNELS)}."
        )
    if kernel == "auto":
        forced = os.environ.get(KERNEL_ENV_VAR, "").strip().lower()
        if forced:
            if forced not in KERNELS:
                raise ValueError(
                    f"{KERNEL_ENV_VAR}={forced!r} is not a WKV kernel. "
                    f"Use one of {', '.join(KERNELS)}."
                )
            return resolve_kernel(forced) if forced != "auto" else "python"
        return "python"
    if kernel == "cuda":
        raise NotImplementedError(
            "The CUDA WKV kernel is not available in this version of "
            "keras_rwkv. Use kernel='python' (or 'auto'), which runs on "
            "every backend and device."
        )
    return kernel


def wkv6(
    r,
    k,
    v,
    log_w,
    u,
    initial_state=None,
    kernel="auto",
    chunk_size=DEFAULT_CHUNK_SIZE,
):
    """Runs the WKV6 recurrence over a sequence. See the module docstring.

    Args:
        r, k, v, log_w: tensors `[B, T, H, N]`.
        u: tensor `[H, N]`.
        initial_state: optional float32 `[B or 1, H, N, N]`.
        kernel: `"auto"`, `"python"` or `"cuda"`.
        chunk_size: chunk length of the Python chunked form.

    Returns:
        `(y, final_state)`.
    """
    resolve_kernel(kernel)
    if len(r.shape) != 4:
        raise ValueError(
            f"wkv6 expects r, k, v, log_w of shape [B, T, H, N]; got r "
            f"with shape {tuple(r.shape)}."
        )
    out_dtype = r.dtype
    r, k, v, log_w, u = (ops.cast(x, "float32") for x in (r, k, v, log_w, u))
    batch = ops.shape(r)[0]
    num_heads, head_size = r.shape[2], r.shape[3]
    state_shape = (batch, num_heads, head_size, head_size)
    if initial_state is None:
        state = ops.zeros(state_shape, "float32")
    else:
        state = ops.broadcast_to(
            ops.cast(initial_state, "float32"), state_shape
        )
    if r.shape[1] == 1:
        y, final_state = wkv6_step(r, k, v, log_w, u, state)
    else:
        y, final_state = wkv6_chunked(
            r, k, v, log_w, u, state, chunk_size=chunk_size
        )
    return ops.cast(y, out_dtype), final_state
