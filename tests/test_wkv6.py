"""The Python WKV op against a float64 step-by-step recurrence (torch
autograd for gradients), on random inputs with decays spread over
w_raw in [-10, 5]."""

import numpy as np
import pytest
import torch
from keras import ops

from keras_rwkv.ops.wkv6 import resolve_kernel
from keras_rwkv.ops.wkv6 import wkv6
from tests.backend_utils import value_and_grad
from tests.reference import relative_error
from tests.reference import wkv_reference_torch

# fp32 chunked math vs float64 recurrence.
FWD_TOL = 1e-4
GRAD_TOL = 1e-3


def random_inputs(b, t, h, n, seed, with_state=True):
    rng = np.random.default_rng(seed)
    r, k, v = (
        rng.standard_normal((b, t, h, n)).astype(np.float32) for _ in range(3)
    )
    w_raw = rng.uniform(-10.0, 5.0, (b, t, h, n))
    log_w = (-np.exp(w_raw)).astype(np.float32)
    u = rng.standard_normal((h, n)).astype(np.float32)
    s0 = rng.standard_normal((b, h, n, n)).astype(np.float32)
    return r, k, v, log_w, u, (s0 if with_state else None)


def reference(r, k, v, log_w, u, s0):
    args = [torch.tensor(x, dtype=torch.float64) for x in (r, k, v, log_w, u)]
    b, _, h, n = r.shape
    s = (
        torch.zeros(b, h, n, n, dtype=torch.float64)
        if s0 is None
        else (torch.tensor(s0, dtype=torch.float64))
    )
    y, s = wkv_reference_torch(*args, s)
    return y.numpy(), s.numpy()


@pytest.mark.parametrize("t", [1, 7, 64, 1000])
@pytest.mark.parametrize("with_state", [True, False])
def test_forward_and_final_state(t, with_state):
    inputs = random_inputs(2, t, 3, 16, seed=t, with_state=with_state)
    y, s = wkv6(*inputs[:5], initial_state=inputs[5], kernel="python")
    y_ref, s_ref = reference(*inputs)
    assert relative_error(ops.convert_to_numpy(y), y_ref) <= FWD_TOL
    assert relative_error(ops.convert_to_numpy(s), s_ref) <= FWD_TOL


@pytest.mark.parametrize("t", [1, 7, 64, 1000])
def test_gradients_of_every_input(t):
    b, h, n = 2, 2, 8
    inputs = random_inputs(b, t, h, n, seed=100 + t)
    rng = np.random.default_rng(t)
    gy = rng.standard_normal((b, t, h, n))
    gs = rng.standard_normal((b, h, n, n))

    def loss(r, k, v, log_w, u, s0):
        y, s = wkv6(r, k, v, log_w, u, initial_state=s0, kernel="python")
        return ops.sum(y * ops.convert_to_tensor(gy, "float32")) + ops.sum(
            s * ops.convert_to_tensor(gs, "float32")
        )

    _, grads = value_and_grad(loss, list(inputs))
    assert_gradients_match_recurrence(grads, inputs, gy, gs)


def assert_gradients_match_recurrence(grads, inputs, gy, gs):
    """`grads` of `sum(y * gy) + sum(final_state * gs)` with respect to
    `inputs` (r, k, v, log_w, u and, if given, the initial state `[B or 1,
    H, N, N]`) against the float64 recurrence's; returns its y and final
    state."""
    ts = [
        torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in inputs
    ]
    b, _, h, n = inputs[0].shape
    s0 = ts[5] if len(ts) > 5 else torch.zeros(1, h, n, n).double()
    y, s = wkv_reference_torch(*ts[:5], s0.expand(b, h, n, n))
    ref_loss = (y * torch.tensor(gy)).sum() + (s * torch.tensor(gs)).sum()
    ref_grads = torch.autograd.grad(ref_loss, ts)
    names = ["r", "k", "v", "log_w", "u", "initial_state"]
    for name, g, g_ref in zip(names, grads, ref_grads):
        err = relative_error(g, g_ref.numpy())
        assert err <= GRAD_TOL, f"d/d{name}: relative error {err:.2e}"
    return y.detach(), s.detach()


def test_batch_one_state_broadcasts():
    r, k, v, log_w, u, s0 = random_inputs(3, 20, 2, 8, seed=5)
    y, s = wkv6(r, k, v, log_w, u, initial_state=s0[:1], kernel="python")
    y_ref, s_ref = reference(r, k, v, log_w, u, np.repeat(s0[:1], 3, 0))
    assert relative_error(ops.convert_to_numpy(y), y_ref) <= FWD_TOL
    assert relative_error(ops.convert_to_numpy(s), s_ref) <= FWD_TOL


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])
def test_chunk_size_does_not_change_the_result(chunk_size):
    inputs = random_inputs(1, 77, 2, 8, seed=7)
    y, s = wkv6(*inputs[:5], initial_state=inputs[5], chunk_size=chunk_size)
    y_ref, s_ref = reference(*inputs)
    assert relative_error(ops.convert_to_numpy(y), y_ref) <= FWD_TOL
    assert relative_error(ops.convert_to_numpy(s), s_ref) <= FWD_TOL


def test_bfloat16_inputs_give_bfloat16_output_and_float32_state():
    r, k, v, log_w, u, s0 = random_inputs(1, 33, 2, 8, seed=9)
    bf = [ops.cast(x, "bfloat16") for x in (r, k, v)]
    y, s = wkv6(*bf, log_w, u, initial_state=s0)
    assert ops.convert_to_numpy(ops.cast(y, "float32")).dtype == np.float32
    assert "bfloat16" in str(y.dtype)
    assert "float32" in str(s.dtype)
    y_ref, _ = reference(
        *[ops.convert_to_numpy(ops.cast(x, "float32")) for x in bf],
        log_w,
        u,
        s0,
    )
    y = ops.convert_to_numpy(ops.cast(y, "float32"))
    assert relative_error(y, y_ref) <= 1e-2  # bf16 output rounding


@pytest.mark.slow
def test_long_sequence_stays_finite():
    # Extreme decays over T = 16384: no inf or NaN anywhere.
    r, k, v, log_w, u, s0 = random_inputs(1, 16384, 1, 16, seed=11)
    y, s = wkv6(r, k, v, log_w, u, initial_state=s0, kernel="python")
    assert np.isfinite(ops.convert_to_numpy(y)).all()
    assert np.isfinite(ops.convert_to_numpy(s)).all()
    # ... and the tail still matches the reference restarted from the
    # state the reference reaches there.
    y_ref, s_ref = reference(r, k, v, log_w, u, s0)
    assert relative_error(ops.convert_to_numpy(y), y_ref) <= FWD_TOL
    assert relative_error(ops.convert_to_numpy(s), s_ref) <= FWD_TOL


def test_kernel_selection():
    from keras_rwkv.ops.wkv6 import cuda

    cuda_ok, _ = cuda.availability()
    assert resolve_kernel("python") == "python"
    assert resolve_kernel("auto") == ("cuda" if cuda_ok else "python")
    with pytest.raises(ValueError, match="Unknown WKV kernel"):
        resolve_kernel("triton")
    if not cuda_ok:
        # Forcing the CUDA kernel where it cannot run says why.
        with pytest.raises(cuda.CudaKernelUnavailable, match="kernel='python'"):
            wkv6(*random_inputs(1, 4, 1, 8, seed=0)[:5], kernel="cuda")


def test_kernel_env_var(monkeypatch):
    monkeypatch.setenv("KERAS_RWKV_WKV_KERNEL", "python")
    assert resolve_kernel("auto") == "python"
    monkeypatch.setenv("KERAS_RWKV_WKV_KERNEL", "auto")
    assert resolve_kernel("auto") in ("python", "cuda")
    monkeypatch.setenv("KERAS_RWKV_WKV_KERNEL", "bogus")
    with pytest.raises(ValueError, match="KERAS_RWKV_WKV_KERNEL"):
        resolve_kernel("auto")
