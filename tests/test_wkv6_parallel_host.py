"""The chunk-parallel CUDA forward (`wkv6_parallel.cuh`) run on the host:
its three kernels compiled with g++ over a small CUDA shim (every CUDA
thread a std::thread, `__syncthreads` a barrier; tests/host_emulation/),
against the float64 recurrence. This checks the kernels' indexing, phases
and numerics on any machine; the GPU tests check the same on a card."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from keras_rwkv.ops.wkv6.cuda import build
from tests.reference import wkv_reference_torch

HERE = Path(__file__).resolve().parent / "host_emulation"
KERNELS = build.SOURCE_DIR / "wkv6_parallel.cuh"
# The host build's stand-ins for what only nvcc compiles.
SUBSTITUTIONS = [
    ("#pragma once", ""),
    ('#include "wkv6_kernels.cuh"', '#include "cuda_shim.h"'),
    (
        'asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));',
        "y = exp2f(x);",
    ),
    ("extern __shared__ float4 smem4[];", "float4* smem4 = host_shared;"),
]
# float32 from end to end, as on the card (which adds ex2.approx's ~2^-22
# per exponential): the error budget of the algorithm itself.
TOL = 5e-6


def _host_source():
    text = KERNELS.read_text()
    for old, new in SUBSTITUTIONS:
        assert old in text, f"the emulation's substitution {old!r} is stale"
        text = text.replace(old, new)
    # The launch code (cudaFuncSetAttribute, <<<>>>) stays out.
    cut = text.index("template <typename K>\ninline cudaError_t allow_shared")
    text = text[:cut] + "}  // namespace par\n}  // namespace keras_rwkv_wkv6\n"
    return text + (HERE / "wkv6_parallel_main.cpp").read_text()


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("no g++")
    work = tmp_path_factory.mktemp("wkv6_host")
    source = work / "wkv6_parallel_host.cpp"
    source.write_text(_host_source())
    exe = work / "wkv6_parallel"
    cmd = ["g++", "-O2", "-std=c++20", "-pthread", f"-I{HERE}", "-o", exe]
    proc = subprocess.run(
        [*map(str, cmd), str(source)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return exe


@pytest.mark.parametrize(
    "b,t,h,n,with_state,w_raw",
    [
        (1, 64, 1, 16, False, (-6, 1)),  # one whole chunk
        (2, 200, 2, 16, True, (-10, 5)),  # ragged last chunk
        (1, 129, 1, 32, True, (-10, 5)),
        (2, 130, 2, 64, True, (-10, 5)),
        (1, 63, 1, 64, False, (-6, 1)),  # shorter than a chunk
        (1, 77, 2, 128, True, (-10, 5)),  # 32-step chunks
        (1, 300, 1, 64, True, (-3, -1)),  # slow decays: long memory
    ],
)
def test_parallel_forward_on_the_host(
    emulator, tmp_path, b, t, h, n, with_state, w_raw
):
    rng = np.random.default_rng(t * 131 + n)
    r, k, v = (rng.standard_normal((b, t, h, n), np.float32) for _ in "rkv")
    w = -np.exp(rng.uniform(*w_raw, (b, t, h, n))).astype(np.float32)
    u = rng.standard_normal((h, n), np.float32)
    s0 = rng.standard_normal((b, h, n, n), np.float32)
    for name, x in dict(r=r, k=k, v=v, w=w, u=u, s0=s0).items():
        x.tofile(tmp_path / name)
    args = [emulator, tmp_path, b, t, h, n, int(with_state)]
    subprocess.run([str(a) for a in args], check=True, timeout=300)
    y = np.fromfile(tmp_path / "y", np.float32).reshape(b, t, h, n)
    s = np.fromfile(tmp_path / "s", np.float32).reshape(b, h, n, n)

    def f64(x):
        return torch.tensor(x, dtype=torch.float64)

    state = f64(s0) if with_state else torch.zeros(b, h, n, n).double()
    inputs = [f64(x) for x in (r, k, v, w, u)]
    y_ref, s_ref = wkv_reference_torch(*inputs, state)
    for name, got, ref in (("y", y, y_ref), ("state", s, s_ref)):
        ref = ref.numpy()
        err = np.abs(got - ref).max() / max(np.abs(ref).max(), 1.0)
        assert err <= TOL, f"{name}: relative error {err:.2e}"
