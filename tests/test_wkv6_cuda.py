"""The CUDA WKV6 kernel: build/cache code and dispatch everywhere; the
kernel itself against the float64 recurrence where a GPU is present (the
GPU tests skip cleanly on CPU-only machines such as CI)."""

import stat
import sys

import keras
import numpy as np
import pytest
import torch

from keras_rwkv.ops.wkv6 import cuda
from keras_rwkv.ops.wkv6 import resolve_kernel
from keras_rwkv.ops.wkv6 import wkv6
from keras_rwkv.ops.wkv6.cuda import CudaKernelUnavailable
from keras_rwkv.ops.wkv6.cuda import build
from tests.reference import relative_error
from tests.reference import wkv_reference_torch

CUDA_OK, CUDA_DETAIL = cuda.availability()
needs_gpu = pytest.mark.skipif(
    not CUDA_OK, reason=f"CUDA WKV kernel unavailable: {CUDA_DETAIL}"
)
no_gpu = pytest.mark.skipif(CUDA_OK, reason="a usable CUDA GPU is present")

FWD_TOL = 1e-4
GRAD_TOL = 1e-3


# --- build and cache ------------------------------------------------------


def _fake_nvcc(tmp_path, exit_code=0):
    """An executable that records its arguments and writes the -o file."""
    log = tmp_path / "nvcc.log"
    script = tmp_path / "bin" / "nvcc"
    script.parent.mkdir()
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"open({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
        "out = sys.argv[sys.argv.index('-o') + 1]\n"
        f"if {exit_code}:\n"
        "    sys.stderr.write('error: planted failure')\n"
        f"    sys.exit({exit_code})\n"
        "open(out, 'wb').write(b'not really a library')\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script, log


def test_cache_key_follows_sources_arch_and_framework(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_RWKV_CACHE", str(tmp_path))
    a = build.library_path("torch", "90", "torch2.11")
    assert a.parent == tmp_path
    assert "sm90" in a.name and a.name.startswith("wkv6_torch_")
    assert a == build.library_path("torch", "90", "torch2.11")
    assert a != build.library_path("torch", "80", "torch2.11")
    assert a != build.library_path("torch", "90", "torch2.12")
    assert a != build.library_path("jax", "90", "torch2.11")
    step = build.library_path("matvec_jax", "90", "torch2.11")
    assert step.name.startswith("matvec_jax_sm90_") and step != a
    with pytest.raises(ValueError, match="Unknown CUDA library flavour"):
        build.library_path("tensorflow", "90", "x")


def test_build_runs_nvcc_once_then_uses_the_cache(
    tmp_path, monkeypatch, capsys
):
    nvcc, log = _fake_nvcc(tmp_path)
    monkeypatch.setenv("CUDA_HOME", str(nvcc.parent.parent))
    monkeypatch.setenv("KERAS_RWKV_CACHE", str(tmp_path / "cache"))
    assert build.find_nvcc() == str(nvcc)
    path = build.build("jax", "90", "jax-test", include_dirs=["/xla/inc"])
    assert path.is_file()
    assert "building the CUDA kernels (jax" in capsys.readouterr().err
    args = log.read_text()
    assert "-gencode=arch=compute_90,code=sm_90" in args
    assert "-I/xla/inc" in args and "wkv6_jax_ffi.cu" in args
    assert build.build("jax", "90", "jax-test") == path
    assert len(log.read_text().splitlines()) == 1  # cached: no rebuild
    assert not list(path.parent.glob("*.tmp"))


def test_build_failure_reports_the_compiler_output(tmp_path, monkeypatch):
    nvcc, _ = _fake_nvcc(tmp_path, exit_code=2)
    monkeypatch.setenv("CUDA_HOME", str(nvcc.parent.parent))
    monkeypatch.setenv("KERAS_RWKV_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CudaKernelUnavailable, match="planted failure"):
        build.build("torch", "90", "torch-test", quiet=True)
    assert not list((tmp_path / "cache").glob("*"))


def test_missing_nvcc_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_RWKV_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "find_nvcc", lambda: None)
    with pytest.raises(CudaKernelUnavailable, match="needs nvcc"):
        build.build("torch", "90", "torch-test")


@pytest.mark.parametrize("flavor", sorted(build.FLAVORS))
def test_the_cache_key_covers_every_included_source(flavor):
    # A header left out of `FLAVORS` would let an edit of it load a stale
    # library; so every quoted include, followed through headers, is there.
    listed = build.source_files(flavor)
    found, todo = set(), [listed[0]]
    while todo:
        path = todo.pop()
        found.add(path)
        for line in path.read_text().splitlines():
            if line.startswith('#include "') and "xla/" not in line:
                name = line.split('"')[1]
                todo.append(path.parent / name)
    assert found == set(listed)


def test_an_edited_header_rebuilds(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_RWKV_CACHE", str(tmp_path / "cache"))
    name, unit, headers = build.FLAVORS["step_jax"]
    for path in build.source_files("step_jax"):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    monkeypatch.setitem(
        build.FLAVORS, "step_jax", (name, tmp_path / unit.name, headers)
    )
    before = build.library_path("step_jax", "90", "test")
    last = tmp_path / headers[-1]
    last.write_text(last.read_text() + "// edited\n")
    assert build.library_path("step_jax", "90", "test") != before


@pytest.mark.slow
@pytest.mark.backend_independent
@pytest.mark.skipif(build.find_nvcc() is None, reason="no nvcc")
@pytest.mark.parametrize("flavor", ["torch", "jax"])
def test_sources_compile(tmp_path, monkeypatch, flavor):
    # Compiles for sm_90 whether or not a GPU is here (the step kernels'
    # libraries are built and run by the GPU tests; CI's time is short,
    # so this runs in the JAX pass only).
    monkeypatch.setenv("KERAS_RWKV_CACHE", str(tmp_path))
    include = []
    if flavor == "jax":
        jax = pytest.importorskip("jax")
        include = [jax.ffi.include_dir()]
    path = build.build(flavor, "90", "test", include_dirs=include, quiet=True)
    assert path.stat().st_size > 0


# --- dispatch --------------------------------------------------------------


@no_gpu
def test_auto_falls_back_to_python_without_a_gpu():
    assert resolve_kernel("auto") == "python"
    inputs = [np.ones((1, 3, 1, 8), "float32")] * 4 + [np.ones((1, 8))]
    y, _ = wkv6(*inputs)  # runs on the Python path
    assert tuple(y.shape) == (1, 3, 1, 8)


@no_gpu
def test_forcing_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    with pytest.raises(CudaKernelUnavailable, match="kernel='python'"):
        resolve_kernel("cuda")
    inputs = [np.ones((1, 3, 1, 8), "float32")] * 4 + [np.ones((1, 8))]
    with pytest.raises(CudaKernelUnavailable):
        wkv6(*inputs, kernel="cuda")
    monkeypatch.setenv("KERAS_RWKV_WKV_KERNEL", "cuda")
    with pytest.raises(CudaKernelUnavailable):
        resolve_kernel("auto")


def test_tensorflow_never_uses_cuda():
    ok, reason = cuda.availability("tensorflow")
    assert not ok and "jax and torch" in reason
    with pytest.raises(CudaKernelUnavailable, match="tensorflow"):
        cuda.require("tensorflow")


def test_launch_overrides_reach_the_kernel_call_at_trace_time(monkeypatch):
    """KERAS_RWKV_WKV6_COLS / _GROUPS / _FORM are read at each call and
    passed to the FFI calls as attributes (the kernel reads no
    environment), so a new trace picks up a changed setting."""
    import jax
    import jax.numpy as jnp

    from keras_rwkv.ops.wkv6.cuda import jax_binding

    x = jnp.zeros((1, 4, 2, 16))
    args = (x, x, x, x, jnp.zeros((2, 16)), jnp.zeros((1, 2, 16, 16)))

    def attributes(fn, *a):
        # A new function each time: a trace of the same one is cached.
        eqn = jax.make_jaxpr(lambda *b: fn(*b))(*a).eqns[0]
        return {name: int(v) for name, v in eqn.params["attributes"]}

    forward = jax_binding._forward_call
    assert attributes(forward, *args) == {"cols": 0, "groups": 0, "form": 0}
    monkeypatch.setenv("KERAS_RWKV_WKV6_GROUPS", "4")
    monkeypatch.setenv("KERAS_RWKV_WKV6_FORM", "Parallel")
    got = attributes(forward, *args)
    assert got == {"cols": 0, "groups": 4, "form": 2}
    monkeypatch.setenv("KERAS_RWKV_WKV6_COLS", "2")
    monkeypatch.setenv("KERAS_RWKV_WKV6_FORM", "step")
    backward = jax_binding._backward_call
    got = attributes(backward, *args, x, args[-1], args[-1])
    assert got == {"cols": 2, "groups": 4, "form": 1}
    monkeypatch.setenv("KERAS_RWKV_WKV6_GROUPS", "3")
    with pytest.raises(ValueError, match="KERAS_RWKV_WKV6_GROUPS='3'"):
        attributes(forward, *args)
    monkeypatch.setenv("KERAS_RWKV_WKV6_GROUPS", "4")
    monkeypatch.setenv("KERAS_RWKV_WKV6_FORM", "chunked")
    with pytest.raises(ValueError, match="auto, step, parallel"):
        attributes(forward, *args)


def _c_parameter_types(source, name):
    """The parameter types of C function `name` in `source`, as ctypes
    sees them: "ptr" (any pointer) or "i32" (int)."""
    text = source.split(f" {name}(", 1)[1].split(")", 1)[0]
    kinds = []
    for param in text.split(","):
        kinds.append("ptr" if "*" in param else "i32")
        assert "*" in param or param.split()[0] == "int", param
    return kinds


def test_torch_binding_argtypes_match_the_c_api():
    """ctypes does not check a call against the C signature: a parameter
    added on one side only would pass garbage to the kernel."""
    import ctypes

    from keras_rwkv.ops.wkv6.cuda import build
    from keras_rwkv.ops.wkv6.cuda import torch_binding

    source = build.source_files("torch")[0].read_text()

    class FakeLib:
        def __init__(self):
            self.functions = {}

        def __getattr__(self, name):
            return self.functions.setdefault(name, type("F", (), {})())

    lib = FakeLib()
    torch_binding._declare(lib)
    names = {ctypes.c_void_p: "ptr", ctypes.c_int: "i32"}
    for name in (
        "keras_rwkv_wkv6_forward",
        "keras_rwkv_wkv6_backward",
        "keras_rwkv_wkv6_scratch_bytes",
    ):
        declared = [names[t] for t in lib.functions[name].argtypes]
        assert declared == _c_parameter_types(source, name), name
    # A size_t result read as a C int would truncate scratch sizes >= 2 GB.
    assert (
        lib.functions["keras_rwkv_wkv6_scratch_bytes"].restype
        is ctypes.c_size_t
    )


# --- the kernel (GPU only) -------------------------------------------------


def _random(b, t, h, n, seed, with_state):
    rng = np.random.default_rng(seed)
    r, k, v = (
        rng.standard_normal((b, t, h, n)).astype(np.float32) for _ in range(3)
    )
    log_w = (-np.exp(rng.uniform(-10.0, 5.0, (b, t, h, n)))).astype(np.float32)
    u = rng.standard_normal((h, n)).astype(np.float32)
    s0 = rng.standard_normal((b, h, n, n)).astype(np.float32)
    gy = rng.standard_normal((b, t, h, n)).astype(np.float32)
    gs = rng.standard_normal((b, h, n, n)).astype(np.float32)
    return [r, k, v, log_w, u, s0 if with_state else None], gy, gs


def _reference(inputs, gy, gs):
    ts = [
        None
        if x is None
        else torch.tensor(x, dtype=torch.float64, requires_grad=True)
        for x in inputs
    ]
    b, _, h, n = inputs[0].shape
    s0 = ts[5] if ts[5] is not None else torch.zeros(b, h, n, n).double()
    y, s = wkv_reference_torch(*ts[:5], s0)
    loss = (y * torch.tensor(gy)).sum() + (s * torch.tensor(gs)).sum()
    leaves = [x for x in ts if x is not None]
    return [y, s, *torch.autograd.grad(loss, leaves)]


def _cuda_values_and_grads(inputs, gy, gs, dtype="float32"):
    """y, final state and the gradients, through `wkv6(kernel="cuda")`."""
    backend = keras.config.backend()
    leaves_idx = [i for i, x in enumerate(inputs) if x is not None]
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        def loss(*leaves):
            args = list(inputs)
            for i, x in zip(leaves_idx, leaves):
                args[i] = x
            args[:3] = [a.astype(dtype) for a in args[:3]]
            y, s = wkv6(*args[:5], initial_state=args[5], kernel="cuda")
            value = jnp.sum(y.astype("float32") * gy) + jnp.sum(s * gs)
            return value, (y, s)

        fn = jax.jit(jax.grad(loss, range(len(leaves_idx)), has_aux=True))
        grads, (y, s) = fn(*[jnp.asarray(inputs[i]) for i in leaves_idx])
        return [np.asarray(x, np.float64) for x in (y, s, *grads)]
    ts = [None if x is None else torch.tensor(x, device="cuda") for x in inputs]
    ts[:3] = [x.to(getattr(torch, dtype)) for x in ts[:3]]
    leaves = [ts[i].requires_grad_() for i in leaves_idx]
    y, s = wkv6(*ts[:5], initial_state=ts[5], kernel="cuda")
    loss = (y.float() * torch.tensor(gy, device="cuda")).sum() + (
        s * torch.tensor(gs, device="cuda")
    ).sum()
    grads = torch.autograd.grad(loss, leaves)
    return [x.detach().double().cpu().numpy() for x in (y, s, *grads)]


def _assert_matches(got, ref):
    """y and the state within FWD_TOL of the float64 reference, every
    gradient within GRAD_TOL (relative to the largest reference value)."""
    names = ["y", "state", "dr", "dk", "dv", "dlog_w", "du", "ds0"]
    for name, g, e in zip(names, got, ref):
        tol = FWD_TOL if name in ("y", "state") else GRAD_TOL
        err = relative_error(g, e.detach().numpy())
        assert err <= tol, f"{name}: relative error {err:.2e}"


def _bf16_rounded(inputs):
    """r, k, v rounded to bfloat16 (kept as float32), the rest as given."""
    return [
        torch.tensor(x).bfloat16().float().numpy() if i < 3 else x
        for i, x in enumerate(inputs)
    ]


@needs_gpu
@pytest.mark.parametrize("t", [1, 15, 64, 1000])
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("with_state", [False, True])
def test_cuda_matches_reference(t, b, with_state):
    inputs, gy, gs = _random(b, t, 2, 64, seed=t * 7 + b, with_state=with_state)
    got = _cuda_values_and_grads(inputs, gy, gs)
    ref = _reference(inputs, gy, gs)
    names = ["y", "state", "dr", "dk", "dv", "dlog_w", "du", "ds0"]
    for name, g, e in zip(names, got, ref):
        tol = FWD_TOL if name in ("y", "state") else GRAD_TOL
        e = e.detach().numpy()
        # Absolute below 1: dlog_w is exactly zero at T = 1 with no state,
        # where the kernel's running sums leave float32 rounding.
        err = np.abs(g - e).max() / max(np.abs(e).max(), 1.0)
        assert err <= tol, f"{name}: relative error {err:.2e}"


@needs_gpu
@pytest.mark.parametrize(
    "cols,groups", [(1, 1), (2, 1), (4, 1), (1, 2), (1, 4), (1, 8), (2, 4)]
)
def test_every_launch_shape_matches_reference(monkeypatch, cols, groups):
    """The kernel picks columns per thread and blocks per (batch, head)
    from the problem size; every shape it can pick must agree."""
    monkeypatch.setenv("KERAS_RWKV_WKV6_COLS", str(cols))
    monkeypatch.setenv("KERAS_RWKV_WKV6_GROUPS", str(groups))
    inputs, gy, gs = _random(
        2, 37, 3, 64, seed=cols + 10 * groups, with_state=True
    )
    got = _cuda_values_and_grads(inputs, gy, gs)
    ref = _reference(inputs, gy, gs)
    for g, e in zip(got, ref):
        assert relative_error(g, e.detach().numpy()) <= GRAD_TOL


@needs_gpu
@pytest.mark.parametrize(
    "b,t,n,with_state",
    [
        (2, 200, 16, True),
        (1, 129, 32, True),
        (3, 1000, 64, False),
        (2, 63, 64, True),
        (1, 64, 64, True),
        (2, 77, 128, True),
        (1, 5, 8, True),  # N = 8 has no parallel form: the step kernel
    ],
)
def test_parallel_form_matches_reference(monkeypatch, b, t, n, with_state):
    """The chunk-parallel forward and backward (KERAS_RWKV_WKV6_FORM=
    parallel) on whole and ragged last chunks, every head size, decays
    from w_raw -10 to 5, every gradient."""
    monkeypatch.setenv("KERAS_RWKV_WKV6_FORM", "parallel")
    monkeypatch.setenv("KERAS_RWKV_WKV6_SEGMENTS", "1")
    inputs, gy, gs = _random(b, t, 2, n, seed=t + n, with_state=with_state)
    got = _cuda_values_and_grads(inputs, gy, gs)
    ref = _reference(inputs, gy, gs)
    _assert_matches(got, ref)


@needs_gpu
def test_parallel_form_bfloat16(monkeypatch):
    monkeypatch.setenv("KERAS_RWKV_WKV6_FORM", "parallel")
    inputs, gy, gs = _random(2, 300, 2, 64, seed=4, with_state=True)
    rounded = _bf16_rounded(inputs)
    got = _cuda_values_and_grads(rounded, gy, gs, dtype="bfloat16")
    ref = _reference(rounded, gy, gs)
    for g, e in zip(got, ref):
        assert relative_error(g, e.detach().numpy()) <= 1e-2


@needs_gpu
@pytest.mark.parametrize("segments,t", [(7, 37), (4, 1000), (16, 4096)])
def test_kernel_split_over_time_matches_reference(monkeypatch, segments, t):
    """The kernel on time segments (time_split.py), forced; 37 / 7 leaves
    a padded last segment. (Unforced, T = 1000 at batch 1-3 and 2 heads
    already runs 4 segments in test_cuda_matches_reference.)"""
    monkeypatch.setenv("KERAS_RWKV_WKV6_SEGMENTS", str(segments))
    inputs, gy, gs = _random(2, t, 2, 64, seed=segments, with_state=True)
    inputs[5] = inputs[5][:1]  # a shared state, broadcast before the split
    got = _cuda_values_and_grads(inputs, gy, gs)
    ref = _reference(inputs, gy, gs)
    _assert_matches(got, ref)


@needs_gpu
def test_cuda_bfloat16_and_batch_one_state():
    inputs, gy, gs = _random(3, 100, 2, 64, seed=3, with_state=True)
    inputs[5] = inputs[5][:1]  # one state broadcast over the batch
    rounded = _bf16_rounded(inputs)
    got = _cuda_values_and_grads(rounded, gy, gs, dtype="bfloat16")
    ref = _reference(rounded, gy, gs)
    for g, e in zip(got, ref):
        # bf16 y and input gradients are rounded on output.
        assert relative_error(g, e.detach().numpy()) <= 1e-2


@needs_gpu
def test_auto_picks_cuda_and_decoding_stays_python():
    assert resolve_kernel("auto") == "cuda"
    if keras.config.backend() == "jax":
        import jax

        inputs, _, _ = _random(2, 1, 2, 64, seed=1, with_state=True)
        step = jax.jit(lambda *a: wkv6(*a[:5], initial_state=a[5]))
        y, s = step(*inputs)
        y_ref, s_ref = _reference(inputs, inputs[0], inputs[5])[:2]
        assert relative_error(np.asarray(y), y_ref.detach().numpy()) <= 1e-4


@needs_gpu
def test_jax_vmap_loops_over_the_kernel():
    if keras.config.backend() != "jax":
        pytest.skip("jax only")
    import jax

    inputs, _, _ = _random(2, 33, 2, 16, seed=2, with_state=True)
    stacked = [np.stack([x, x * 0.5]) for x in inputs]
    ys, _ = jax.vmap(lambda *a: wkv6(*a[:5], initial_state=a[5]))(*stacked)
    y1, _ = wkv6(*inputs[:5], initial_state=inputs[5], kernel="cuda")
    assert relative_error(np.asarray(ys[0]), np.asarray(y1)) <= 1e-6


@needs_gpu
def test_jax_sharded_over_gpus_runs_per_device():
    """With 2+ GPUs: inputs sharded over batch stay sharded (no gather),
    and y, the state and the gradients equal one device's."""
    if keras.config.backend() != "jax":
        pytest.skip("jax only")
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = jax.devices()
    if len(devices) < 2:
        pytest.skip("needs 2 or more GPUs")
    b = 2 * len(devices)
    inputs, gy, gs = _random(b, 70, 2, 64, seed=5, with_state=True)

    def loss(*a):
        y, s = wkv6(*a[:5], initial_state=a[5], kernel="cuda")
        return jnp.sum(y * gy) + jnp.sum(s * gs), (y, s)

    grad = jax.value_and_grad(loss, range(6), has_aux=True)
    (_, (y1, s1)), g1 = jax.jit(grad)(*inputs)
    mesh = Mesh(np.array(devices), ("batch",))
    seq = NamedSharding(mesh, P("batch"))
    shardings = (seq,) * 4 + (NamedSharding(mesh, P()), seq)
    sharded = jax.jit(grad, in_shardings=shardings)
    (_, (y2, s2)), g2 = sharded(*inputs)
    assert "all-gather" not in sharded.lower(*inputs).compile().as_text()
    assert y2.sharding.spec[0] == "batch"
    for got, want in zip((y2, s2, *g2), (y1, s1, *g1)):
        assert relative_error(np.asarray(got), np.asarray(want)) <= 1e-6
