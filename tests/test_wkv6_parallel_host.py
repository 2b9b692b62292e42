"""The chunk-parallel CUDA WKV6 (`wkv6_parallel.cuh`, forward, and
`wkv6_parallel_bwd.cuh`, backward) run on the host: its kernels compiled
with g++ over a small CUDA shim (every CUDA thread a std::thread,
`__syncthreads` a barrier; tests/host_emulation/), against the float64
recurrence and its autograd gradients. This checks the kernels' indexing,
phases and numerics on any machine; the GPU tests check the same on a
card."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from keras_rwkv.ops.wkv6.cuda import build
from tests.reference import wkv_reference_torch

pytestmark = pytest.mark.backend_independent
HERE = Path(__file__).resolve().parent / "host_emulation"
# Each header, and where its launch code (cudaFuncSetAttribute, <<<>>>),
# which stays out, begins.
KERNELS = [
    (
        build.SOURCE_DIR / "wkv6_parallel.cuh",
        "template <typename K>\ninline cudaError_t allow_shared",
    ),
    (
        build.SOURCE_DIR / "wkv6_parallel_bwd.cuh",
        "template <typename T, int N>\ninline cudaError_t launch_backward",
    ),
]
# The host build's stand-ins for what only nvcc compiles.
SUBSTITUTIONS = [
    ("#pragma once", ""),
    ('#include "wkv6_kernels.cuh"', '#include "cuda_shim.h"'),
    ('#include "wkv6_parallel.cuh"', ""),
    (
        'asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));',
        "y = exp2f(x);",
    ),
    ("extern __shared__ float4 smem4[];", "float4* smem4 = host_shared;"),
]
# float32 from end to end, as on the card (which adds ex2.approx's ~2^-22
# per exponential): the error budget of the algorithm itself.
TOL = 5e-6
# dlog_w is a difference of running sums over the whole sequence (as in
# the per-step kernel, whose GPU tests allow 1e-3).
GRAD_TOL = 1e-4


def _host_source():
    texts, used = [], set()
    for path, launch_code in KERNELS:
        text = path.read_text()
        for old, new in SUBSTITUTIONS:
            if old in text:
                used.add(old)
                text = text.replace(old, new)
        text = text[: text.index(launch_code)]
        texts.append(
            text + "}  // namespace par\n}  // namespace keras_rwkv_wkv6\n"
        )
    stale = [old for old, _ in SUBSTITUTIONS if old not in used]
    assert not stale, f"the emulation's substitutions {stale} are stale"
    return "".join(texts) + (HERE / "wkv6_parallel_main.cpp").read_text()


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("no g++")
    work = tmp_path_factory.mktemp("wkv6_host")
    source = work / "wkv6_parallel_host.cpp"
    source.write_text(_host_source())
    exe = work / "wkv6_parallel"
    include = [f"-I{HERE}", f"-I{build.SOURCE_DIR}"]
    cmd = ["g++", "-O2", "-std=c++20", "-pthread", *include, "-o", exe]
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
        (2, 1, 1, 32, True, (-10, 5)),  # one step
    ],
)
def test_parallel_forward_on_the_host(
    emulator, tmp_path, b, t, h, n, with_state, w_raw
):
    rng = np.random.default_rng(t * 131 + n)
    seq, states = (b, t, h, n), (b, h, n, n)
    r, k, v, dy = (rng.standard_normal(seq, np.float32) for _ in "rkvy")
    w = -np.exp(rng.uniform(*w_raw, seq)).astype(np.float32)
    u = rng.standard_normal((h, n), np.float32)
    s0, gs = (rng.standard_normal(states, np.float32) for _ in "sg")
    arrays = dict(r=r, k=k, v=v, w=w, u=u, s0=s0, dy=dy, gs=gs)
    for name, x in arrays.items():
        x.tofile(tmp_path / name)
    args = [emulator, tmp_path, b, t, h, n, int(with_state)]
    subprocess.run([str(a) for a in args], check=True, timeout=300)

    def out(name, shape):
        return np.fromfile(tmp_path / name, np.float32).reshape(shape)

    p, q = out("p", seq), out("q", seq)
    got = {
        "y": out("y", seq),
        "state": out("s", states),
        "dr": out("dr", seq),
        "dk": out("dk", seq),
        "dv": out("dv", seq),
        # As the bindings form them (wkv6_kernels.cuh).
        "dlog_w": q + p[:, -1:] - p,
        "du": out("du", (b, h, n)).sum(0),
    }
    if with_state:
        got["ds0"] = out("ds0", states)

    leaves = {
        name: torch.tensor(arrays[name], dtype=torch.float64).requires_grad_()
        for name in ("r", "k", "v", "w", "u", "s0")
    }
    state = leaves["s0"] if with_state else torch.zeros(states).double()
    y_ref, s_ref = wkv_reference_torch(
        *(leaves[name] for name in "rkvwu"), state
    )
    loss = (y_ref * torch.tensor(dy).double()).sum() + (
        s_ref * torch.tensor(gs).double()
    ).sum()
    names = ["dr", "dk", "dv", "dlog_w", "du"] + ["ds0"] * with_state
    grads = torch.autograd.grad(
        loss, [leaves[x] for x in "rkvwu"] + [leaves["s0"]] * with_state
    )
    ref = {"y": y_ref, "state": s_ref, **dict(zip(names, grads))}
    for name, value in got.items():
        expected = ref[name].detach().numpy()
        err = np.abs(value - expected).max() / max(np.abs(expected).max(), 1)
        tol = TOL if name in ("y", "state") else GRAD_TOL
        assert err <= tol, f"{name}: relative error {err:.2e}"
