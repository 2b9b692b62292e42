"""keras.distribution: DataParallel and ModelParallel (2 x 4) on 8 virtual
CPU devices match one device, for forward, a fit step, generate, state
tuning and LoRA; variables are sharded as `get_layout_map` says.

XLA_FLAGS must be set before JAX starts, and the rest of the suite runs
with one device in this process, so every check runs in a subprocess that
builds the single-device reference (no distribution) and the distributed
model side by side, and reports one line per check.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("jax")
if os.environ.get("KERAS_BACKEND", "jax") != "jax":
    pytest.skip("keras.distribution runs on JAX", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tolerances (float32 on CPU). Forward logits and returned states: max
# error relative to the largest element. Fit step: SGD, whose first step
# is lr * gradient; per variable, the L2 norm of the update's error over
# the update's norm. Sharded reductions sum in another order, and some
# gradients are sums with heavy cancellation (time_maa_x, reached only
# through the small mix-LoRA weights, measures ~3e-4 even under plain
# DataParallel; everything else < 3e-5).
FORWARD_RTOL = 1e-5
STATE_RTOL = 1e-5
LOSS_RTOL = 1e-5
UPDATE_RTOL = 2e-3

SCRIPT = r"""
import json
import re
import sys
import traceback

import jax
import keras
import numpy as np

from keras_rwkv import RWKV6Backbone
from keras_rwkv import RWKV6CausalLM

MODE = sys.argv[1]
FORWARD_RTOL, STATE_RTOL, LOSS_RTOL, UPDATE_RTOL = map(float, sys.argv[2:6])
assert jax.device_count() == 8, jax.devices()
# H = 4 heads of 64, so the model axis (4) holds one head per device; F
# differs from C so a transposed layout cannot go unnoticed.
DIMS = dict(
    vocabulary_size=256,
    num_layers=2,
    hidden_dim=256,
    intermediate_dim=512,
    mix_lora_dim=8,
    decay_lora_dim=16,
)
B, T = 8, 24
results = {}


def check(name):
    def run(fn):
        try:
            detail = fn()
            results[name] = {"ok": True, "detail": detail}
        except Exception:
            results[name] = {"ok": False, "detail": traceback.format_exc()}

    return run


def distribution():
    devices = keras.distribution.list_devices()
    if MODE == "dp":
        return keras.distribution.DataParallel(devices=devices)
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), devices)
    return keras.distribution.ModelParallel(
        layout_map=RWKV6Backbone.get_layout_map(mesh),
        batch_dim_name="batch",
    )


def build(dist, variant=None):
    keras.distribution.set_distribution(dist)
    keras.utils.set_random_seed(0)
    lm = RWKV6CausalLM(RWKV6Backbone(**DIMS))
    if variant == "lora":
        lm.backbone.enable_lora(rank=4)
    if variant == "state":
        lm.enable_state_tuning(time_shift=True)
    return lm


def randomize(lm):
    # Logits of order 1 (not the 1e-4 init) so greedy choices are clear,
    # and non-zero LoRA B factors / tuned states so they matter.
    rng = np.random.default_rng(1)
    c = DIMS["hidden_dim"]
    for v in lm.weights:
        name = v.path.split("/")[-1]
        scale = {
            "embeddings": 1.0,
            "reverse_embeddings": 4.0 / c**0.5,
            "lora_kernel_b": 0.05,
            "initial_wkv": 0.2,
            "initial_shift": 0.5,
        }.get(name)
        if scale is not None:
            v.assign(rng.normal(0.0, scale, v.shape).astype("float32"))


rng = np.random.default_rng(0)
ids = rng.integers(1, 256, (B, T)).astype("int32")
mask = np.ones((B, T), "int32")
for row, pads in enumerate([5, 0, 3, 0, 9, 1, 0, 2]):
    mask[row, :pads] = 0
x = {"token_ids": ids * mask, "padding_mask": mask}
# Left-padded prompts of mixed lengths, and a continuation.
lengths = [1, 7, 3, 12, 5, 12, 9, 2]
prompt_ids = np.zeros((B, 12), "int32")
prompt_mask = np.zeros((B, 12), "int32")
for row, n in enumerate(lengths):
    prompt_ids[row, 12 - n :] = ids[row, :n]
    prompt_mask[row, 12 - n :] = 1
prompts = {"token_ids": prompt_ids, "padding_mask": prompt_mask}
more = {"token_ids": ids[:, 12:16], "padding_mask": np.ones((B, 4), "int32")}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def fit_step(lm):
    lm.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        sampler="greedy",
    )
    before = lm.get_weights()
    history = lm.fit(
        x,
        ids,
        sample_weight=mask,
        batch_size=B,
        epochs=1,
        shuffle=False,
        verbose=0,
    )
    after = lm.get_weights()
    updates = {
        v.path: a - b for v, a, b in zip(lm.weights, after, before)
    }
    return history.history["loss"][0], updates


def generations(lm, kinds):
    out = {}
    if "batch" in kinds:
        out["batch"] = lm.generate(
            prompts, max_new_tokens=10, stop_token_ids=None
        )
    if "batch3" in kinds:
        # Batch 3 does not divide over the data axis: stays replicated.
        small = {k: v[:3] for k, v in prompts.items()}
        out["batch3"] = lm.generate(
            small, max_new_tokens=10, stop_token_ids=None
        )
    if "continued" in kinds:
        # A state in (prefill) and out (return_state).
        state = lm.prefill(prompts)
        out["continued"], out["state"] = lm.generate(
            more,
            state=state,
            max_new_tokens=6,
            stop_token_ids=None,
            return_state=True,
        )
    return out


def compare_generations(got, ref):
    for key in ("batch", "batch3", "continued"):
        if key not in ref:
            continue
        for field in ("token_ids", "padding_mask"):
            a, b = got[key][field], ref[key][field]
            assert np.array_equal(a, b), (key, field, a, b)
    detail = f"greedy tokens equal ({', '.join(sorted(ref))})"
    if "state" in ref:
        wkv = rel(got["state"].wkv, ref["state"].wkv)
        shift = rel(got["state"].shift, ref["state"].shift)
        assert wkv < STATE_RTOL and shift < STATE_RTOL, (wkv, shift)
        # The batch was split over the data axis, not decoded whole on
        # every device.
        sharding = got["state"].wkv.sharding
        assert not sharding.is_fully_replicated, sharding
        detail += f"; state rel err wkv {wkv:.1e} shift {shift:.1e}"
    return detail


def compare_fit(got, ref, trainable):
    loss, updates = got
    ref_loss, ref_updates = ref
    loss_err = abs(loss - ref_loss) / abs(ref_loss)
    assert loss_err < LOSS_RTOL, (loss, ref_loss)
    worst, moved = 0.0, 0
    for path, update in updates.items():
        ref_update = ref_updates[path]
        if path not in trainable:
            assert not np.abs(update).any(), f"frozen {path} moved"
            continue
        assert np.abs(ref_update).max() > 0, f"{path} did not move"
        err = float(
            np.linalg.norm(update - ref_update) / np.linalg.norm(ref_update)
        )
        assert err < UPDATE_RTOL, (path, err)
        worst, moved = max(worst, err), moved + 1
    assert moved == len(trainable), (moved, trainable)
    return (
        f"loss {loss:.6f} (rel err {loss_err:.1e}); {moved} updated "
        f"variables, worst rel err {worst:.1e}"
    )


# Expected layouts, written out independently of get_layout_map.
COLUMN, ROW = ("batch", "model"), ("model", "batch")
EXPECTED = [
    (r"token_embedding/embeddings", ROW),
    (r"token_embedding/reverse_embeddings", COLUMN),
    (r"block_\d/time_mix/(receptance|key|value|gate)/kernel", COLUMN),
    (r"block_\d/time_mix/output/kernel", ROW),
    (r"block_\d/channel_mix/(key|receptance)/kernel", COLUMN),
    (r"block_\d/channel_mix/value/kernel", ROW),
    (r"block_\d/time_mix/(receptance|key|value|gate)/lora_kernel_a",
     ("batch", None)),
    (r"block_\d/time_mix/(receptance|key|value|gate)/lora_kernel_b",
     (None, "model")),
    (r"block_\d/time_mix/output/lora_kernel_a", ("model", None)),
    (r"block_\d/time_mix/output/lora_kernel_b", (None, "batch")),
    (r"block_\d/channel_mix/(key|receptance)/lora_kernel_a",
     ("batch", None)),
    (r"block_\d/channel_mix/(key|receptance)/lora_kernel_b",
     (None, "model")),
    (r"block_\d/channel_mix/value/lora_kernel_a", ("model", None)),
    (r"block_\d/channel_mix/value/lora_kernel_b", (None, "batch")),
]
AXIS_SIZE = {"batch": 2, "model": 4, None: 1}


def expected_spec(path, ndim):
    for pattern, spec in EXPECTED:
        if re.fullmatch(pattern, path):
            return spec
    return (None,) * ndim  # replicated


def check_layout(variables, references=None):
    # `references`: the model variable each one must follow (optimizer).
    sharded = 0
    for i, v in enumerate(variables):
        path = v.path if references is None else references[i].path
        want = expected_spec(path, len(v.shape))
        sharding = v.value.sharding
        spec = tuple(sharding.spec) + (None,) * (
            len(v.shape) - len(sharding.spec)
        )
        assert spec == want, (v.path, spec, want)
        local = sharding.shard_shape(v.shape)
        want_local = tuple(
            n // AXIS_SIZE[a] for n, a in zip(v.shape, want)
        )
        assert local == want_local, (v.path, local, want_local)
        if any(want):
            sharded += 1
        else:
            assert sharding.is_fully_replicated, v.path
    return sharded


def run_variant(variant):
    # Reference on one device, then the same under the distribution.
    forward = variant is None and MODE == "mp"
    kinds = {
        None: ["batch", "continued"] + (["batch3"] if MODE == "dp" else []),
        "state": [],
        "lora": [],
    }[variant]
    after_fit = ["batch"] if variant == "state" else []
    ref = build(None, variant)
    randomize(ref)
    weights = ref.get_weights()
    trainable = {v.path for v in ref.trainable_variables}
    if forward:
        ref_logits = np.asarray(ref.predict(x, batch_size=B, verbose=0))
    ref_gen = generations(ref, kinds)
    ref_fit = fit_step(ref)
    ref_gen_after = generations(ref, after_fit)

    lm = build(distribution(), variant)
    lm.set_weights(weights)
    tag = f"{MODE}_{variant or 'full'}"
    if MODE == "mp":

        @check(f"{tag}_layout")
        def _():
            n = check_layout(lm.weights)
            return f"{n} of {len(lm.weights)} variables sharded as expected"

    if forward:

        @check(f"{tag}_forward")
        def _():
            logits = np.asarray(lm.predict(x, batch_size=B, verbose=0))
            err = rel(logits, ref_logits)
            assert err < FORWARD_RTOL, err
            return f"logits rel err {err:.1e}"

        @check(f"{tag}_collectives")
        def _():
            # Megatron-style tensor parallelism: per layer one reduction
            # after each mix and one gather of the ChannelMix gated product.
            # A residual stream left split by channel instead costs a
            # gather before every projection (6 a layer).
            backbone = lm.backbone
            fn = jax.jit(
                lambda t, n, i: backbone.stateless_call(t, n, i)[0]
            )
            hlo = (
                fn.lower(
                    [v.value for v in backbone.trainable_variables],
                    [v.value for v in backbone.non_trainable_variables],
                    x,
                )
                .compile()
                .as_text()
            )
            # Activations [batch, T, channels]; the FSDP part of the
            # layout also gathers weights over the data axis (rank 2).
            pattern = rf"= \w+\[\d+,{T},\d\d+\]\S* all-gather\("
            gathers = re.findall(pattern, hlo)
            layers = DIMS["num_layers"]
            assert len(gathers) <= layers, gathers
            return f"{len(gathers)} activation all-gathers for {layers} layers"

    if kinds:

        @check(f"{tag}_generate")
        def _():
            return compare_generations(generations(lm, kinds), ref_gen)

    @check(f"{tag}_fit")
    def _():
        detail = compare_fit(fit_step(lm), ref_fit, trainable)
        if MODE == "mp":
            # SGD momentums, one per trainable variable, same order.
            momentums = lm.optimizer.momentums
            check_layout(momentums, lm.trainable_variables)
            detail += f"; {len(momentums)} momentums laid out alike"
        if after_fit:
            # Generation from what the distributed step trained.
            got = generations(lm, after_fit)
            detail += "; then " + compare_generations(got, ref_gen_after)
        return detail


run_variant(None)
run_variant("state")
if MODE == "mp":
    run_variant("lora")
print("RESULTS " + json.dumps(results))
"""


# Two processes of 4 CPU devices each, joined with jax.distributed (gloo
# collectives): the multi-host recipe of docs/distribution.md. Mesh (2, 4):
# the batch axis spans the processes, the model axis stays inside each.
MULTIHOST_SCRIPT = r"""
import json
import sys
import traceback

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
import keras

process_id, port = int(sys.argv[1]), sys.argv[2]
LOSS_RTOL, UPDATE_RTOL = float(sys.argv[3]), float(sys.argv[4])
keras.distribution.initialize(
    job_addresses=f"localhost:{port}", num_processes=2, process_id=process_id
)
import numpy as np
import tensorflow as tf
from jax.experimental import multihost_utils

from keras_rwkv import RWKV6Backbone
from keras_rwkv import RWKV6CausalLM

DIMS = dict(
    vocabulary_size=256,
    num_layers=2,
    hidden_dim=256,
    intermediate_dim=512,
    mix_lora_dim=8,
    decay_lora_dim=16,
)
results = {}
try:
    assert (jax.process_count(), jax.device_count()) == (2, 8)
    rng = np.random.default_rng(0)  # the same global data on every process
    ids = rng.integers(1, 256, (8, 24)).astype("int32")
    data = ({"token_ids": ids, "padding_mask": np.ones_like(ids)}, ids)
    prompts = {
        "token_ids": ids[:, :5],
        "padding_mask": np.ones((8, 5), "int32"),
    }

    def build(distribution):
        keras.distribution.set_distribution(distribution)
        keras.utils.set_random_seed(0)
        return RWKV6CausalLM(RWKV6Backbone(**DIMS))

    def numpy(value):
        # A weight split over both processes is gathered to every host.
        if value.is_fully_addressable:
            return np.asarray(value)
        return multihost_utils.process_allgather(value, tiled=True)

    def step_and_generate(lm, before):
        lm.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            sampler="greedy",
        )
        # One global batch of 8; Keras gives each process its half.
        dataset = tf.data.Dataset.from_tensor_slices(data).batch(
            8, drop_remainder=True
        )
        loss = lm.fit(dataset, epochs=1, verbose=0).history["loss"][0]
        updates = [numpy(v.value) - w for v, w in zip(lm.weights, before)]
        gen = lm.generate(prompts, max_new_tokens=6, stop_token_ids=None)
        return loss, updates, gen

    ref = build(None)  # one local device
    # Logits of order 1 (not the 1e-4 init), as in the other checks.
    head = ref.backbone.token_embedding.reverse_embeddings
    head.assign(rng.normal(0.0, 0.25, head.shape).astype("float32"))
    weights = ref.get_weights()
    ref_loss, ref_updates, ref_gen = step_and_generate(ref, weights)
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), devices)
    lm = build(
        keras.distribution.ModelParallel(
            layout_map=RWKV6Backbone.get_layout_map(mesh),
            batch_dim_name="batch",
        )
    )
    lm.set_weights(weights)
    loss, updates, gen = step_and_generate(lm, weights)
    assert abs(loss - ref_loss) / ref_loss < LOSS_RTOL, (loss, ref_loss)
    worst = max(
        float(np.linalg.norm(u - r) / np.linalg.norm(r))
        for u, r in zip(updates, ref_updates)
    )
    assert worst < UPDATE_RTOL, worst
    for field in ("token_ids", "padding_mask"):
        assert np.array_equal(gen[field], ref_gen[field]), field
    results["ok"] = True
    results["detail"] = (
        f"process {process_id}: loss {loss:.6f} (one device {ref_loss:.6f}), "
        f"worst update rel err {worst:.1e}, generate equal"
    )
except Exception:
    results["ok"] = False
    results["detail"] = traceback.format_exc()
print("RESULTS " + json.dumps({f"multihost_{process_id}": results}))
"""


def free_port():
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def run_checks():
    """Runs the single-process scripts (DataParallel, ModelParallel) and the
    two-process one concurrently (they compile mostly on one core each),
    and returns `{check name: {"ok", "detail"}}`."""
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    eight = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    four = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    tolerances = [FORWARD_RTOL, STATE_RTOL, LOSS_RTOL, UPDATE_RTOL]
    port = str(free_port())
    jobs = {
        "dp": ([SCRIPT, "dp", *map(str, tolerances)], eight),
        "mp": ([SCRIPT, "mp", *map(str, tolerances)], eight),
    }
    for pid in ("0", "1"):
        argv = [MULTIHOST_SCRIPT, pid, port, str(LOSS_RTOL), str(UPDATE_RTOL)]
        jobs[f"multihost_{pid}"] = (argv, four)
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", *argv],
            env=job_env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (argv, job_env) in jobs.items()
    }
    results = {}
    for name, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        lines = [
            line for line in stdout.splitlines() if line.startswith("RESULTS ")
        ]
        if proc.returncode or not lines:
            results[name] = {
                "ok": False,
                "detail": f"subprocess {name} failed (exit "
                f"{proc.returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}",
            }
            continue
        results.update(json.loads(lines[-1][len("RESULTS ") :]))
    return results


@pytest.fixture(scope="module")
def results():
    return run_checks()


def assert_check(results, name):
    assert name in results, f"{name} did not run: {sorted(results)}"
    outcome = results[name]
    assert outcome["ok"], outcome["detail"]
    print(f"{name}: {outcome['detail']}")


@pytest.mark.parametrize(
    "name",
    [
        "dp_full_generate",
        "dp_full_fit",
        "dp_state_fit",
    ],
)
def test_data_parallel_matches_one_device(results, name):
    assert_check(results, name)


@pytest.mark.parametrize(
    "name",
    [
        "mp_full_layout",
        "mp_full_forward",
        "mp_full_collectives",
        "mp_full_generate",
        "mp_full_fit",
        "mp_state_layout",
        "mp_state_fit",
        "mp_lora_layout",
        "mp_lora_fit",
    ],
)
def test_model_parallel_matches_one_device(results, name):
    assert_check(results, name)


@pytest.mark.parametrize("name", ["multihost_0", "multihost_1"])
def test_two_processes_match_one_device(results, name):
    assert_check(results, name)


def test_layout_map_rejects_unknown_axes():
    import keras

    from keras_rwkv import RWKV6Backbone

    devices = keras.distribution.list_devices()[:1]
    mesh = keras.distribution.DeviceMesh((1, 1), ("data", "model"), devices)
    with pytest.raises(ValueError, match="batch"):
        RWKV6Backbone.get_layout_map(mesh)
    layout_map = RWKV6Backbone.get_layout_map(
        mesh, data_parallel_dim_name="data"
    )
    assert tuple(layout_map["block_3/time_mix/key/kernel"].axes) == (
        "data",
        "model",
    )
    assert layout_map["block_3/time_mix/time_faaaa"] is None
    # Without a data axis the weights are split over the model axis only.
    layout_map = RWKV6Backbone.get_layout_map(mesh, data_parallel_dim_name=None)
    assert tuple(layout_map["block_0/channel_mix/value/kernel"].axes) == (
        "model",
        None,
    )
