"""CUDA WKV6 kernel on the GPU: correctness against a float64 recurrence
(both bindings, every gradient) and speed against fla's `chunk_rwkv6` and
rwkv-ops' JAX CUDA op, on the same card in the same process.

Usage (on a GPU machine):
    XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/wkv_cuda_gpu.py \
        [--check] [--bench] [--sanitize-case]
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from keras_rwkv.ops.wkv6 import cuda  # noqa: E402
from keras_rwkv.ops.wkv6 import time_split  # noqa: E402
from keras_rwkv.ops.wkv6.cuda import jax_binding  # noqa: E402
from keras_rwkv.ops.wkv6.cuda import torch_binding  # noqa: E402

NAMES = ["y", "state", "dr", "dk", "dv", "dlog_w", "du", "ds0"]
# Launch-shape overrides, read by the bindings at each call (trace time
# under jit): value columns (key rows) per thread and blocks per (batch,
# head).
COLS_ENV = "KERAS_RWKV_WKV6_COLS"
GROUPS_ENV = "KERAS_RWKV_WKV6_GROUPS"
# The forward's form (per-step or chunk-parallel), read the same way.
FORM_ENV = "KERAS_RWKV_WKV6_FORM"
# (cols, groups); None leaves the kernel's own choice.
SHAPES = [(None, None), (1, 1), (2, 1), (4, 1), (1, 2), (1, 4), (1, 8), (2, 4)]


# Time segments (time_split.py) for the JAX op; None: the default rule.
SEGMENTS = [None, 1, 4, 16]


def no_sync():
    pass


def set_segments(segments):
    if segments is None:
        os.environ.pop(time_split.SEGMENTS_ENV_VAR, None)
    else:
        os.environ[time_split.SEGMENTS_ENV_VAR] = str(segments)


def set_shape(cols, groups):
    """Forces a launch shape (None: the kernel's default)."""
    for env, value in ((COLS_ENV, cols), (GROUPS_ENV, groups)):
        if value is None:
            os.environ.pop(env, None)
        else:
            os.environ[env] = str(value)


def set_form(form):
    """Forces the forward's form ("step", "parallel"; None: auto)."""
    if form is None:
        os.environ.pop(FORM_ENV, None)
    else:
        os.environ[FORM_ENV] = form


def shape_name(cols, groups):
    if cols is None and groups is None:
        return "default"
    return f"C{cols}xG{groups}"


def arch():
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}"


def random_case(b, t, h, n, seed, with_state, w_lo=-10.0, w_hi=5.0):
    rng = np.random.default_rng(seed)
    r, k, v = (rng.standard_normal((b, t, h, n)) for _ in range(3))
    log_w = -np.exp(rng.uniform(w_lo, w_hi, (b, t, h, n)))
    u = rng.standard_normal((h, n))
    s0 = rng.standard_normal((b, h, n, n)) if with_state else None
    gy = rng.standard_normal((b, t, h, n))
    gs = rng.standard_normal((b, h, n, n))
    return [r, k, v, log_w, u, s0], gy, gs


def reference(inputs, gy, gs):
    """float64 step-by-step recurrence on the GPU, torch autograd."""
    dev = "cuda"
    ts = [
        None
        if x is None
        else torch.tensor(x, dtype=torch.float64, device=dev).requires_grad_()
        for x in inputs
    ]
    r, k, v, log_w, u, s0 = ts
    b, t_len, h, n = r.shape
    s = torch.zeros(b, h, n, n, dtype=torch.float64, device=dev)
    if s0 is not None:
        s = s + s0
    ys = []
    for t in range(t_len):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        ys.append(torch.einsum("bhi,bhij->bhj", r[:, t], s + u[..., None] * kv))
        s = torch.exp(log_w[:, t])[..., None] * s + kv
    y = torch.stack(ys, 1)
    loss = (y * torch.tensor(gy, device=dev)).sum() + (
        s * torch.tensor(gs, device=dev)
    ).sum()
    wrt = [x for x in ts if x is not None]
    grads = torch.autograd.grad(loss, wrt)
    out = [y, s, *grads]
    if s0 is None:
        out.append(None)
    return [None if x is None else x.detach().cpu().numpy() for x in out]


def run_jax(inputs, gy, gs, dtype=jnp.float32):
    args = [None if x is None else jnp.asarray(x, jnp.float32) for x in inputs]
    r, k, v = (a.astype(dtype) for a in args[:3])
    rest = args[3:]

    def loss(r, k, v, log_w, u, s0):
        y, s = jax_binding.wkv6(r, k, v, log_w, u, s0)
        return jnp.sum(y.astype(jnp.float32) * gy) + jnp.sum(s * gs), (y, s)

    has_s0 = rest[2] is not None
    argnums = (0, 1, 2, 3, 4, 5) if has_s0 else (0, 1, 2, 3, 4)
    fn = jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))
    grads, (y, s) = fn(r, k, v, *rest)
    out = [y, s, *grads] + ([] if has_s0 else [None])
    return [None if x is None else np.asarray(x, np.float64) for x in out]


def run_torch(inputs, gy, gs, dtype=torch.float32):
    ts = [
        None
        if x is None
        else torch.tensor(x, dtype=torch.float32, device="cuda")
        for x in inputs
    ]
    ts[:3] = [x.to(dtype) for x in ts[:3]]
    for x in ts:
        if x is not None:
            x.requires_grad_()
    y, s = torch_binding.wkv6(*ts)
    loss = (y.float() * torch.tensor(gy, device="cuda")).sum() + (
        s * torch.tensor(gs, device="cuda")
    ).sum()
    wrt = [x for x in ts if x is not None]
    grads = torch.autograd.grad(loss, wrt)
    out = [y, s, *grads] + ([None] if ts[5] is None else [])
    return [
        None if x is None else x.detach().double().cpu().numpy() for x in out
    ]


def rel(a, b):
    # Relative to the largest reference value, or absolute below 1: some
    # gradients are exactly zero (dlog_w at T = 1 with no state).
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1.0))


def run_jax_default(*a, **k):
    return run_jax(*a, **k)


def in_form(form, fn):
    def run(*a, **k):
        set_form(form)
        try:
            return fn(*a, **k)
        finally:
            set_form(None)

    return run


VARIANTS = (
    [("jax", run_jax_default, None, None)]
    + [("torch", run_torch, cols, groups) for cols, groups in SHAPES]
    + [
        ("jax-par", in_form("parallel", run_jax), None, None),
        ("torch-par", in_form("parallel", run_torch), None, None),
    ]
)


def check():
    print("## correctness: max|ours - ref| / max(max|ref|, 1), float64 ref")
    header = " ".join(f"{n:>8}" for n in NAMES)
    print("binding/shape       dtype B T state | " + header)
    worst = {}
    for t in (1, 15, 64, 1000, 4097):
        for b in (1, 3):
            for with_state in (False, True):
                inputs, gy, gs = random_case(b, t, 2, 64, t + b, with_state)
                ref = reference(inputs, gy, gs)
                for name, fn, cols, groups in VARIANTS:
                    set_shape(cols, groups)
                    got = fn(inputs, gy, gs)
                    name = f"{name}/{shape_name(cols, groups)}"
                    errs = [
                        float("nan") if g is None else rel(g, e)
                        for g, e in zip(got, ref)
                    ]
                    key = name
                    worst[key] = float(np.nanmax([worst.get(key, 0.0)] + errs))
                    print(
                        f"{name:13} f32 {b} {t:5} {int(with_state)} | "
                        + " ".join(f"{e:8.1e}" for e in errs)
                    )
    set_shape(None, None)
    # bf16 inputs: compare to the reference run on the same rounded inputs.
    inputs, gy, gs = random_case(2, 777, 4, 64, 5, True, -6.0, 1.0)
    rounded = [
        np.asarray(torch.tensor(x).bfloat16().double()) if i < 3 else x
        for i, x in enumerate(inputs)
    ]
    ref = reference(rounded, gy, gs)
    for name, fn, dt in (
        ("jax", run_jax, jnp.bfloat16),
        ("torch", run_torch, torch.bfloat16),
        ("jax-par", in_form("parallel", run_jax), jnp.bfloat16),
        ("torch-par", in_form("parallel", run_torch), torch.bfloat16),
    ):
        got = fn(rounded, gy, gs, dt)
        errs = [rel(g, e) for g, e in zip(got, ref)]
        print(
            f"{name:9} bf16 2   777 1 | " + " ".join(f"{e:8.1e}" for e in errs)
        )
    print("worst fp32 error per binding:", worst)


def timeit(fn, sync, reps=10, warmup=3):
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class _Results(dict):
    """Prints each timing as it lands (a later anchor may be slow to
    build or autotune, and a time limit must not lose the earlier ones)."""

    def __setitem__(self, name, value):
        super().__setitem__(name, value)
        print(f"{name:36} fwd {value[0]:8.3f} ms  fwd+bwd {value[1]:8.3f} ms")
        sys.stdout.flush()


def bench(impls, b, t, h, n, forms=(None,)):
    inputs, _, _ = random_case(b, t, h, n, 0, True, -6.0, 1.0)
    rng = np.random.default_rng(1)
    gy_np = rng.standard_normal((b, t, h, n)).astype(np.float32)
    results = _Results()

    # ours, JAX
    r, k, v = (jnp.asarray(x, jnp.bfloat16) for x in inputs[:3])
    log_w, u, s0 = (jnp.asarray(x, jnp.float32) for x in inputs[3:])
    gy = jnp.asarray(gy_np, jnp.bfloat16)
    fwd = jax.jit(lambda *a: jax_binding.wkv6(*a))

    def loss(r, k, v, log_w, u, s0):
        y, s = jax_binding.wkv6(r, k, v, log_w, u, s0)
        return jnp.sum(y.astype(jnp.float32) * gy) + jnp.sum(s)

    fb = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)))
    args = (r, k, v, log_w, u, s0)
    set_shape(None, None)
    results["ours (JAX FFI)"] = (
        timeit(lambda: jax.block_until_ready(fwd(*args)), no_sync),
        timeit(lambda: jax.block_until_ready(fb(*args)), no_sync),
    )
    # Each forced form of the forward: new jits (read at trace time).
    for form in forms:
        if form is None:
            continue
        set_form(form)
        fwd_f = jax.jit(lambda *a: jax_binding.wkv6(*a))
        fb_f = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)))
        results[f"ours (JAX FFI, {form})"] = (
            timeit(lambda f=fwd_f: jax.block_until_ready(f(*args)), no_sync),
            timeit(lambda f=fb_f: jax.block_until_ready(f(*args)), no_sync),
        )
        if form != "step":
            y_f, s_f = fwd_f(*args)
            set_form("step")
            y_s, s_s = jax.jit(lambda *a: jax_binding.wkv6(*a))(*args)
            print(
                f"{form} vs step: y",
                rel(np.asarray(y_f, np.float64), np.asarray(y_s, np.float64)),
                "state",
                rel(np.asarray(s_f, np.float64), np.asarray(s_s, np.float64)),
            )
    set_form(None)

    # ours, JAX, split over time (time_split.py) into K segments; "auto"
    # is the default rule. The split happens at trace time: new jits.
    for segments in SEGMENTS:
        set_segments(segments)

        def loss_split(r, k, v, log_w, u, s0):
            y, s = cuda.wkv6_cuda(r, k, v, log_w, u, s0)
            return jnp.sum(y.astype(jnp.float32) * gy) + jnp.sum(s)

        fwd_split = jax.jit(lambda *a: cuda.wkv6_cuda(*a))
        fb_split = jax.jit(jax.grad(loss_split, argnums=(0, 1, 2, 3, 4, 5)))
        name = "auto" if segments is None else f"K={segments}"
        results[f"ours (JAX, split {name})"] = tuple(
            timeit(lambda f=f: jax.block_until_ready(f(*args)), no_sync)
            for f in (fwd_split, fb_split)
        )
    set_segments(None)

    # ours, torch, and fla on the same torch tensors
    dev = "cuda"
    tr, tk, tv = (
        torch.tensor(x, dtype=torch.bfloat16, device=dev) for x in inputs[:3]
    )
    tw, tu, ts0 = (
        torch.tensor(x, dtype=torch.float32, device=dev) for x in inputs[3:]
    )
    tgy = torch.tensor(gy_np, dtype=torch.bfloat16, device=dev)
    sync = torch.cuda.synchronize

    def grads_of(fn, leaves):
        for x in leaves:
            x.requires_grad_()

        def step():
            y, s = fn()
            torch.autograd.backward((y, s), (tgy, torch.ones_like(s)))
            for x in leaves:
                x.grad = None

        return step

    if "torch" in impls:
        leaves = [tr, tk, tv, tw, tu, ts0]
        outs = {}
        for cols, groups in SHAPES:
            set_shape(cols, groups)
            with torch.no_grad():
                f_ours = timeit(lambda: torch_binding.wkv6(*leaves), sync)
            fb_ours = timeit(
                grads_of(lambda: torch_binding.wkv6(*leaves), leaves), sync
            )
            name = shape_name(cols, groups)
            results[f"ours (torch op, {name})"] = (f_ours, fb_ours)
            # The launch shapes must agree on the full-size problem too.
            y, s = torch_binding.wkv6(*leaves)
            torch.autograd.backward((y, s), (tgy, torch.ones_like(s)))
            outs[name] = [y.detach(), s.detach()] + [x.grad for x in leaves]
            for x in leaves:
                x.grad = None
        ref = outs.pop("C1xG1")
        for name, got in outs.items():
            errs = [
                rel(a.double().cpu().numpy(), b.double().cpu().numpy())
                for a, b in zip(got, ref)
            ]
            print(f"{name} vs C1xG1:", " ".join(f"{e:.1e}" for e in errs))
        del outs, ref
        set_shape(None, None)

    if "rwkv-ops" in impls:
        try:
            op = rwkv_ops_wkv6(head_size=n, max_sequence_length=t)
            c = h * n
            r, k, v, w = (
                jnp.asarray(x.reshape(b, t, c), jnp.bfloat16)
                for x in inputs[:4]
            )
            u = jnp.asarray(inputs[4], jnp.bfloat16)
            s0 = jnp.asarray(inputs[5], jnp.float32)
            gy = jnp.asarray(gy_np.reshape(b, t, c), jnp.bfloat16)
            f = jax.jit(
                lambda *a: op(*a, initial_state=s0, output_final_state=True)
            )

            def loss2(r, k, v, w, u):
                y = op(r, k, v, w, u)
                y = y[0] if isinstance(y, tuple) else y
                return jnp.sum(y.astype(jnp.float32) * gy)

            g = jax.jit(jax.grad(loss2, argnums=(0, 1, 2, 3, 4)))
            a = (r, k, v, w, u)
            results["rwkv-ops JAX CUDA (no state grad)"] = (
                timeit(lambda: jax.block_until_ready(f(*a)), lambda: None),
                timeit(lambda: jax.block_until_ready(g(*a)), lambda: None),
            )
        except Exception as e:  # noqa: BLE001 - report and go on
            print("rwkv-ops failed:", type(e).__name__, str(e)[:300])

    if "fla" in impls:
        try:
            from fla.ops.rwkv6 import chunk_rwkv6

            tw_bf = tw.detach().to(torch.bfloat16)
            tu_bf = tu.detach().to(torch.bfloat16)
            fla_leaves = [tr, tk, tv, tw_bf, tu_bf, ts0]

            def fla_call():
                return chunk_rwkv6(
                    tr,
                    tk,
                    tv,
                    tw_bf,
                    tu_bf,
                    scale=1.0,
                    initial_state=ts0,
                    output_final_state=True,
                )

            with torch.no_grad():
                f_fla = timeit(fla_call, sync)
            fb_fla = timeit(grads_of(fla_call, fla_leaves), sync)
            results["fla chunk_rwkv6"] = (f_fla, fb_fla)
            # Same answer? (fla's own bf16 numerics; loose.)
            with torch.no_grad():
                y_f, s_f = fla_call()
                y_o, s_o = torch_binding.wkv6(tr, tk, tv, tw, tu, ts0)
            print(
                "fla vs ours: y rel err",
                rel(y_f.double().cpu().numpy(), y_o.double().cpu().numpy()),
                "state rel err",
                rel(s_f.double().cpu().numpy(), s_o.double().cpu().numpy()),
            )
        except Exception as e:  # noqa: BLE001 - report and go on
            print("fla failed:", type(e).__name__, str(e)[:300])
        torch.cuda.empty_cache()
    card = torch.cuda.get_device_name()
    bound_f, bound_fb = dram_bound_ms(b, t, h, n)
    print(f"## speed: B={b} T={t} H={h} N={n} bf16, {card}")
    print(
        f"DRAM bound (the op's own bytes at {dram_bandwidth() / 1e12:.2f} "
        f"TB/s): fwd {bound_f:.3f} ms, fwd+bwd {bound_fb:.3f} ms"
    )
    print(
        f"{'impl':36} {'fwd ms':>8} {'of bound':>8} {'fwd+bwd ms':>11} "
        f"{'of bound':>8}"
    )
    for name, (f, fb) in results.items():
        print(
            f"{name:36} {f:8.3f} {bound_f / f:8.1%} {fb:11.3f} "
            f"{bound_fb / fb:8.1%}"
        )
    ours = results["ours (JAX FFI)"]
    for name, (f, fb) in results.items():
        print(
            f"ratio {name} / ours(JAX): fwd {f / ours[0]:.2f}x, "
            f"fwd+bwd {fb / ours[1]:.2f}x"
        )


def dram_bandwidth():
    """The card's peak DRAM bytes/s, from its memory clock and bus width
    (cupy's device properties; torch does not report them)."""
    try:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        # kHz, double data rate, bits.
        return props["memoryClockRate"] * 1e3 * 2 * props["memoryBusWidth"] / 8
    except Exception:  # noqa: BLE001 - no cupy: the H100 SXM's figure
        return 3.35e12


def dram_bound_ms(b, t, h, n):
    """The least time the op's own traffic takes at the DRAM's peak,
    forward and forward+backward, bf16 sequences: the forward reads r, k,
    v (2 bytes each) and log_w (4) and writes y (2); the backward reads
    those and dy and writes dr, dk, dv (2 each) and dlog_w (4); the states
    (float32 [B, H, N, N]) once each way."""
    elems, state = b * t * h * n, 4 * b * h * n * n
    fwd = 12 * elems + 2 * state
    bwd = 22 * elems + 3 * state
    per_ms = dram_bandwidth() / 1e3
    return fwd / per_ms, (fwd + bwd) / per_ms


def rwkv_ops_wkv6(head_size, max_sequence_length):
    """rwkv-ops' RWKV6 JAX CUDA op, loaded from its file: importing the
    `rwkv_ops` package first sets up every other kernel it ships, which
    took longer than a device call. Builds with cmake on first use."""
    import importlib.util

    spec = importlib.util.find_spec("rwkv_ops")
    path = os.path.join(
        os.path.dirname(spec.origin),
        "rwkv6_kernel",
        "jax_cuda_kernel",
        "wkv6_jax.py",
    )
    module_spec = importlib.util.spec_from_file_location("rwkv6_jax", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_jax_rwkv6(
        head_size=head_size, max_sequence_length=max_sequence_length
    )


def sanitize_case():
    """A small case for compute-sanitizer (torch binding, both passes,
    both forms of the forward)."""
    for form in ("step", "parallel"):
        set_form(form)
        for with_state in (False, True):
            inputs, gy, gs = random_case(2, 137, 3, 64, 3, with_state)
            run_torch(inputs, gy, gs)
            run_torch(inputs, gy, gs, torch.bfloat16)
        for n in (16, 32, 128):
            inputs, gy, gs = random_case(1, 45, 2, n, 3, True)
            run_torch(inputs, gy, gs)
    set_form(None)
    torch.cuda.synchronize()
    print("sanitize case done")


def profile_case(shape):
    """Two forwards of the torch op at one B,T,H,N shape (bf16), for
    Nsight Compute (`ncu -k regex:chunk_outputs ...`): the form is the
    environment's."""
    b, t, h, n = (int(x) for x in shape.split(","))
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*size):
        return torch.randn(*size, device="cuda", generator=g)

    r, k, v = (randn(b, t, h, n).bfloat16() for _ in range(3))
    uniform = torch.empty(b, t, h, n, device="cuda").uniform_(
        -6.0, 1.0, generator=g
    )
    log_w = -torch.exp(uniform)
    u, s0 = randn(h, n), randn(b, h, n, n)
    for _ in range(2):
        y, _ = torch_binding.wkv6(r, k, v, log_w, u, s0)
    torch.cuda.synchronize()
    print("profile case done:", float(y.float().abs().mean()))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--bench", action="store_true")
    parser.add_argument("--sanitize-case", action="store_true")
    parser.add_argument(
        "--profile-case",
        default=None,
        help="B,T,H,N: only run two forwards of the torch op there (ncu)",
    )
    parser.add_argument(
        "--impls",
        default="torch,rwkv-ops,fla",
        help="besides ours (JAX): any of torch, rwkv-ops, fla",
    )
    parser.add_argument(
        "--shapes",
        default="8,4096,32,64",
        help="B,T,H,N problem shapes for --bench, separated by ';'",
    )
    parser.add_argument(
        "--forms",
        default="",
        help="forced forms of the forward to time besides auto, e.g. "
        "step,parallel",
    )
    parser.add_argument(
        "--segments",
        default=None,
        help="time-segment counts for the split JAX op, e.g. 1,4,16 "
        "('auto' for the default rule)",
    )
    parser.add_argument(
        "--build-rwkv-ops",
        action="store_true",
        help="only build rwkv-ops' kernel (B=8 T=4096 shape), then exit",
    )
    a = parser.parse_args()
    if a.build_rwkv_ops:
        rwkv_ops_wkv6(head_size=64, max_sequence_length=4096)
        return
    import jaxlib

    torch_binding.load(arch())
    if a.profile_case:
        profile_case(a.profile_case)
        return
    if not a.sanitize_case:
        jax_binding.load(arch())
    print(
        "jax",
        jax.__version__,
        "jaxlib",
        jaxlib.__version__,
        "torch",
        torch.__version__,
        torch.cuda.get_device_name(),
    )
    if a.sanitize_case:
        sanitize_case()
    if a.check:
        check()
    if a.segments:
        SEGMENTS[:] = [
            None if x == "auto" else int(x) for x in a.segments.split(",")
        ]
    if a.bench:
        for shape in a.shapes.split(";"):
            dims = (int(x) for x in shape.split(","))
            forms = [None] + [f for f in a.forms.split(",") if f]
            bench(a.impls.split(","), *dims, forms=forms)


if __name__ == "__main__":
    main()
