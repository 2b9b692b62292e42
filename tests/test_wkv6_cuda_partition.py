"""The JAX binding's sharding and vmap rules, on CPU.

The CUDA kernel needs a GPU, but everything around its two FFI calls
(custom_vjp, the per-shard partitioning over batch and heads, vmap
folding) is plain JAX. `jax_binding.make_wkv6` takes the two calls as
arguments, so here they are stand-ins with the same contract, written with
`lax.scan`, and the whole binding runs on 8 virtual CPU devices in a
subprocess (XLA_FLAGS must be set before JAX starts). The stand-ins record
the shapes they are traced with: under sharding they must see one device's
shard, under vmap the folded batch.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("jax")
if os.environ.get("KERAS_BACKEND", "jax") != "jax":
    pytest.skip("the JAX binding", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# float32 on CPU: sharded and unsharded runs sum in different orders.
RTOL = 1e-5

SCRIPT = r"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from keras_rwkv.ops.wkv6.cuda import jax_binding

assert jax.device_count() == 8
print("SHARDY", jax.config.jax_use_shardy_partitioner)
traced = {"forward": [], "backward": []}


def recurrence(r, k, v, log_w, u, s0, per_row_u):
    # The WKV6 step recurrence, the stand-in's and the reference's math.
    def step(s, x):
        rt, kt, vt, wt = x
        kv = kt[..., :, None] * vt[..., None, :]
        y = jnp.einsum("bhn,bhnm->bhm", rt, s + per_row_u[..., None] * kv)
        return jnp.exp(wt)[..., None] * s + kv, y

    xs = [jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in (r, k, v, log_w)]
    s, y = jax.lax.scan(step, s0, xs)
    return jnp.moveaxis(y, 0, 1).astype(r.dtype), s


def fake_forward(r, k, v, log_w, u, s0):
    traced["forward"].append(r.shape)
    per_row_u = jnp.broadcast_to(u, (r.shape[0], *u.shape))
    return recurrence(r, k, v, log_w, u, s0, per_row_u)


def fake_backward(r, k, v, log_w, u, s0, gy, gs, s_final):
    # Same outputs as the kernel: P = 0 and Q = dlog_w, du per row.
    traced["backward"].append(r.shape)
    per_row_u = jnp.broadcast_to(u, (r.shape[0], *u.shape))
    _, vjp = jax.vjp(
        lambda *a: recurrence(*a[:5], a[5], a[6]),
        r, k, v, log_w, u, s0, per_row_u,
    )
    dr, dk, dv, dw, _, ds0, du = vjp((gy, gs))
    return dr, dk, dv, jnp.zeros_like(dw), dw, du, ds0


wkv6 = jax_binding.make_wkv6(fake_forward, fake_backward)


def reference(r, k, v, log_w, u, s0):
    s0 = jnp.broadcast_to(s0, (r.shape[0], *s0.shape[1:]))
    return recurrence(r, k, v, log_w, u, s0, u[None])


B, T, H, N = 4, 9, 4, 8
rng = np.random.default_rng(0)
r, k, v = (rng.standard_normal((B, T, H, N)).astype("float32") for _ in "rkv")
log_w = -np.exp(rng.uniform(-3, 1, (B, T, H, N))).astype("float32")
u = rng.standard_normal((H, N)).astype("float32")
s0 = rng.standard_normal((B, H, N, N)).astype("float32")
gy = rng.standard_normal((B, T, H, N)).astype("float32")
gs = rng.standard_normal((B, H, N, N)).astype("float32")
args = (r, k, v, log_w, u, s0)


def loss_and_grads(fn):
    def loss(*a):
        y, s = fn(*a)
        return jnp.sum(y * gy) + jnp.sum(s * gs)

    return jax.value_and_grad(loss, argnums=range(6))


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


results = {}
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("batch", "model"))
seq = NamedSharding(mesh, P("batch", None, "model", None))
in_shardings = (
    seq, seq, seq, seq,
    NamedSharding(mesh, P("model", None)),
    NamedSharding(mesh, P("batch", "model")),
)

# 1. forward, sharded over batch (4) and heads (2).
fwd = jax.jit(wkv6, in_shardings=in_shardings)
y, s = fwd(*args)
y_ref, s_ref = reference(*args)
results["forward_y"] = rel(y, y_ref)
results["forward_state"] = rel(s, s_ref)
results["forward_traced"] = [list(x) for x in traced["forward"]]
hlo = fwd.lower(*args).compile().as_text()
results["forward_all_gather"] = "all-gather" in hlo
results["forward_out_sharding"] = str(y.sharding.spec)

# 2. gradients of every input, sharded.
traced["forward"].clear()
value, grads = jax.jit(
    loss_and_grads(wkv6), in_shardings=in_shardings
)(*args)
ref_value, ref_grads = jax.jit(loss_and_grads(reference))(*args)
results["loss"] = rel(value, ref_value)
results["grads"] = [rel(g, e) for g, e in zip(grads, ref_grads)]
results["backward_traced"] = [list(x) for x in traced["backward"]]

# 3. one state shared by the batch ([1, H, N, N]): its gradient sums rows.
shared = list(args)
shared[5] = s0[:1]
_, grads = jax.jit(loss_and_grads(wkv6))(*shared)
_, ref_grads = jax.jit(loss_and_grads(reference))(*shared)
results["shared_state_grad"] = rel(grads[5], ref_grads[5])
results["shared_state_grad_shape"] = list(grads[5].shape)

# 4. vmap with u shared: folded into the batch (one call of 2 * B rows).
# (New T per case: JAX caches traces, so a seen shape is not traced again.)
traced["forward"].clear()
stacked = [np.stack([x, 0.5 * x])[:, :, :7] for x in (r, k, v, log_w)]
ys, _ = jax.vmap(wkv6, in_axes=(0, 0, 0, 0, None, None))(*stacked, u, s0)
results["vmap_fold_traced"] = [list(x) for x in traced["forward"]]
results["vmap_fold"] = max(
    rel(ys[i], reference(*[x[i] for x in stacked], u, s0)[0])
    for i in range(2)
)

# 5. vmap with u mapped too: looped, one batch at a time.
traced["forward"].clear()
stacked = [x[:, :, :5] for x in stacked]
us = np.stack([u, -u])
ys, _ = jax.vmap(wkv6, in_axes=(0, 0, 0, 0, 0, None))(*stacked, us, s0)
results["vmap_loop_traced"] = [list(x) for x in traced["forward"]]
results["vmap_loop"] = max(
    rel(ys[i], reference(*[x[i] for x in stacked], us[i], s0)[0])
    for i in range(2)
)

# 6. grad of vmap: the custom_vjp's rules run batched.
_, g = jax.value_and_grad(
    lambda u: jnp.sum(
        jax.vmap(wkv6, in_axes=(0, 0, 0, 0, None, None))(*stacked, u, s0)[0]
    )
)(u)
_, g_ref = jax.value_and_grad(
    lambda u: sum(
        jnp.sum(reference(*[x[i] for x in stacked], u, s0)[0])
        for i in range(2)
    )
)(u)
results["grad_of_vmap"] = rel(g, g_ref)

# 7. split over time (time_split.py) around the sharded op: 4 segments of
# a 10-step sequence (the last one padded), sharded over batch and heads.
from keras_rwkv.ops.wkv6 import time_split


def split(*a):
    return time_split.split_over_time(wkv6, *a, segments=4)


traced["forward"].clear()
traced["backward"].clear()
args10 = [x[:, :10] if x.ndim == 4 else x for x in args]
split_fwd = jax.jit(split, in_shardings=in_shardings)
y, s = split_fwd(*args10)
y_ref, s_ref = reference(*args10)
results["split_y"] = rel(y, y_ref)
results["split_state"] = rel(s, s_ref)
results["split_all_gather"] = (
    "all-gather" in split_fwd.lower(*args10).compile().as_text()
)
gy10 = gy[:, :10]


def split_loss(fn):
    def loss(*a):
        y, s = fn(*a)
        return jnp.sum(y * gy10) + jnp.sum(s * gs)

    return jax.grad(loss, argnums=range(6))


grads = jax.jit(split_loss(split), in_shardings=in_shardings)(*args10)
ref_grads = jax.jit(split_loss(reference))(*args10)
results["split_grads"] = [rel(g, e) for g, e in zip(grads, ref_grads)]
results["split_traced"] = [list(x) for x in traced["forward"]]
print("RESULTS " + json.dumps(results))
"""


# Shardy (JAX's default) uses the sharding rule; the older GSPMD
# partitioner uses `infer_sharding_from_operands`: both are checked.
@pytest.fixture(scope="module", params=["shardy", "gspmd"])
def results(request):
    env = dict(os.environ)
    env["JAX_USE_SHARDY_PARTITIONER"] = str(request.param == "shardy")
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if f"SHARDY {request.param != 'shardy'}" in proc.stdout:
        pytest.skip(f"this JAX cannot run the {request.param} partitioner")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULTS "):
            return json.loads(line[len("RESULTS ") :])
    pytest.fail(f"binding script failed:\n{proc.stderr[-4000:]}")


def test_sharded_forward_runs_per_shard_and_matches(results):
    assert results["forward_y"] <= RTOL
    assert results["forward_state"] <= RTOL
    # custom_partitioning traces once at the global shape for its jaxpr,
    # then lowers per shard: B = 4 over 4 devices, H = 4 over 2.
    assert results["forward_traced"] == [[4, 9, 4, 8], [1, 9, 2, 8]]
    assert not results["forward_all_gather"]
    assert results["forward_out_sharding"] == "P('batch', None, 'model')"


def test_sharded_gradients_match(results):
    assert results["loss"] <= RTOL
    names = ["dr", "dk", "dv", "dlog_w", "du", "ds0"]
    for name, err in zip(names, results["grads"]):
        assert err <= RTOL, f"{name}: {err:.2e}"
    assert results["backward_traced"] == [[4, 9, 4, 8], [1, 9, 2, 8]]


def test_shared_initial_state_gradient_sums_rows(results):
    assert results["shared_state_grad"] <= RTOL
    assert results["shared_state_grad_shape"] == [1, 4, 8, 8]


def test_vmap_folds_into_the_batch_when_u_is_shared(results):
    assert results["vmap_fold"] <= RTOL
    # One call for both mapped inputs (custom_vmap may also trace the
    # unmapped function once first).
    assert results["vmap_fold_traced"][-1] == [8, 7, 4, 8]
    assert [4, 7, 4, 8] not in results["vmap_fold_traced"][1:]


def test_vmap_loops_when_u_is_mapped(results):
    assert results["vmap_loop"] <= RTOL
    traced = results["vmap_loop_traced"]
    assert traced and all(shape == [4, 5, 4, 8] for shape in traced)


def test_grad_of_vmap(results):
    assert results["grad_of_vmap"] <= RTOL


def test_time_split_runs_per_shard_and_matches(results):
    """Segments become rows of each device's shard: batch 1 of 4 x 4
    segments = 4 rows of 3 steps, 2 of 4 heads; nothing gathered."""
    assert results["split_y"] <= RTOL
    assert results["split_state"] <= RTOL
    names = ["dr", "dk", "dv", "dlog_w", "du", "ds0"]
    for name, err in zip(names, results["split_grads"]):
        assert err <= RTOL, f"{name}: {err:.2e}"
    assert [4, 3, 2, 8] in results["split_traced"]
    assert not results["split_all_gather"]
