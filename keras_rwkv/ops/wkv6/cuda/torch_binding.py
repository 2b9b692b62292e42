"""torch binding of the CUDA WKV6 kernel: `torch.library` custom ops with
autograd, calling the kernel library through ctypes.

ctypes keeps the build free of torch's C++ headers (a build of seconds
instead of minutes); the ops take torch's current stream, and being
registered custom ops they also trace under `torch.compile`.
"""

import ctypes

import torch

from keras_rwkv.ops.wkv6.cuda import build
from keras_rwkv.utils import settings

_state = {}
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def load(arch):
    """Builds (once) and loads the kernel library.

    Args:
        arch: compute capability without the dot, e.g. `"90"`.
    """
    if _state:
        return
    path = build.build("torch", arch, f"torch{torch.__version__}")
    lib = ctypes.CDLL(str(path))
    _declare(lib)
    _state.update(lib=lib, arch=arch, path=path)


def _declare(lib):
    """Sets the C API's argument and result types on `lib`."""
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    lib.keras_rwkv_wkv6_forward.argtypes = (
        [i32] * 5 + [ptr] * 6 + [i32] + [ptr] * 2 + [i32] * 3 + [ptr] * 2
    )
    lib.keras_rwkv_wkv6_forward.restype = i32
    lib.keras_rwkv_wkv6_backward.argtypes = (
        [i32] * 5 + [ptr] * 6 + [i32] + [ptr] * 10 + [i32] * 3 + [ptr] * 2
    )
    lib.keras_rwkv_wkv6_backward.restype = i32
    lib.keras_rwkv_wkv6_scratch_bytes.argtypes = [i32] * 6
    lib.keras_rwkv_wkv6_scratch_bytes.restype = ctypes.c_size_t
    lib.keras_rwkv_wkv6_error_string.argtypes = [i32]
    lib.keras_rwkv_wkv6_error_string.restype = ctypes.c_char_p


def describe():
    """One line saying what runs."""
    return f"CUDA WKV6 kernel via torch.library (sm_{_state['arch']})"


def _check(rc):
    if rc != 0:
        msg = _state["lib"].keras_rwkv_wkv6_error_string(rc).decode()
        raise RuntimeError(f"wkv6 CUDA kernel: {msg}")


def _scratch(r, launch, backward):
    """The parallel form's chunk states as a byte tensor, or None for the
    per-step form. The caller keeps it until the launch is queued;
    torch's allocator orders its reuse on the stream."""
    b, t, h, n = r.shape
    size = _state["lib"].keras_rwkv_wkv6_scratch_bytes(
        b, t, h, n, launch["form"], int(backward)
    )
    if not size:
        return None
    return torch.empty(size, dtype=torch.uint8, device=r.device)


def _stream(x):
    return ctypes.c_void_p(torch.cuda.current_stream(x.device).cuda_stream)


@torch.library.custom_op("keras_rwkv::wkv6_forward", mutates_args=())
def _forward(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_w: torch.Tensor,
    u: torch.Tensor,
    s0: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, t, h, n = r.shape
    y = torch.empty_like(r)
    s = torch.empty((b, h, n, n), dtype=torch.float32, device=r.device)
    launch = settings.wkv6_launch()
    lib = _state["lib"]
    scratch = _scratch(r, launch, backward=False)
    with torch.cuda.device(r.device):
        _check(
            lib.keras_rwkv_wkv6_forward(
                _DTYPES[r.dtype],
                b,
                t,
                h,
                n,
                r.data_ptr(),
                k.data_ptr(),
                v.data_ptr(),
                log_w.data_ptr(),
                u.data_ptr(),
                s0.data_ptr(),
                int(s0.shape[0] != 1),
                y.data_ptr(),
                s.data_ptr(),
                launch["cols"],
                launch["groups"],
                launch["form"],
                None if scratch is None else scratch.data_ptr(),
                _stream(r),
            )
        )
    return y, s


@_forward.register_fake
def _(r, k, v, log_w, u, s0):
    b, _, h, n = r.shape
    return torch.empty_like(r), r.new_empty((b, h, n, n), dtype=torch.float32)


@torch.library.custom_op("keras_rwkv::wkv6_backward", mutates_args=())
def _backward_op(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_w: torch.Tensor,
    u: torch.Tensor,
    s0: torch.Tensor,
    dy: torch.Tensor,
    gs: torch.Tensor,
    s_final: torch.Tensor,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    b, t, h, n = r.shape
    dr, dk, dv = (torch.empty_like(r) for _ in range(3))
    p, q = (torch.empty_like(log_w) for _ in range(2))
    du = torch.empty((b, h, n), dtype=torch.float32, device=r.device)
    ds0 = torch.empty((b, h, n, n), dtype=torch.float32, device=r.device)
    launch = settings.wkv6_launch()
    scratch = _scratch(r, launch, backward=True)
    with torch.cuda.device(r.device):
        _check(
            _state["lib"].keras_rwkv_wkv6_backward(
                _DTYPES[r.dtype],
                b,
                t,
                h,
                n,
                r.data_ptr(),
                k.data_ptr(),
                v.data_ptr(),
                log_w.data_ptr(),
                u.data_ptr(),
                s0.data_ptr(),
                int(s0.shape[0] != 1),
                dy.data_ptr(),
                gs.data_ptr(),
                s_final.data_ptr(),
                dr.data_ptr(),
                dk.data_ptr(),
                dv.data_ptr(),
                p.data_ptr(),
                q.data_ptr(),
                du.data_ptr(),
                ds0.data_ptr(),
                launch["cols"],
                launch["groups"],
                launch["form"],
                None if scratch is None else scratch.data_ptr(),
                _stream(r),
            )
        )
    # See wkv6_kernels.cuh: dlog_w = Q + P_{T-1} - P.
    dlog_w = q.add_(p[:, -1:]).sub_(p)
    ds0 = ds0 if s0.shape[0] == b else ds0.sum(0, keepdim=True)
    return dr, dk, dv, dlog_w, du.sum(0), ds0


@_backward_op.register_fake
def _(r, k, v, log_w, u, s0, dy, gs, s_final):
    return (
        torch.empty_like(r),
        torch.empty_like(r),
        torch.empty_like(r),
        torch.empty_like(log_w),
        torch.empty_like(u),
        torch.empty_like(s0),
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[1])


def _backward(ctx, gy, gs):
    r, k, v, log_w, u, s0, s_final = ctx.saved_tensors
    gy = torch.zeros_like(r) if gy is None else gy.to(r.dtype).contiguous()
    gs = (
        torch.zeros_like(s_final)
        if gs is None
        else gs.to(torch.float32).contiguous()
    )
    return _backward_op(r, k, v, log_w, u, s0, gy, gs, s_final)


_forward.register_autograd(_backward, setup_context=_setup_context)


def wkv6(r, k, v, log_w, u, initial_state):
    """The WKV6 op on CUDA torch tensors, inputs as `cuda.normalize`
    gives them (dtypes and shapes there); returns `(y, final_state)`."""
    args = (r, k, v, log_w, u, initial_state)
    return _forward(*(x.contiguous() for x in args))
