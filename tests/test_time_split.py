"""WKV6 split over time (`time_split.py`): the segments, their entering
states and the kernel's run over them give the float64 recurrence, values
and every gradient. The inner op here is the Python path; the CUDA kernel
under the split is checked in test_wkv6_cuda.py on a GPU."""

import numpy as np
import pytest
from keras import ops

from keras_rwkv.ops.wkv6 import time_split
from keras_rwkv.ops.wkv6 import wkv6
from tests.backend_utils import compiled
from tests.backend_utils import value_and_grad
from tests.reference import relative_error
from tests.test_wkv6 import FWD_TOL
from tests.test_wkv6 import assert_gradients_match_recurrence
from tests.test_wkv6 import random_inputs


def python_wkv(r, k, v, log_w, u, initial_state):
    return wkv6(r, k, v, log_w, u, initial_state, kernel="python")


@pytest.mark.parametrize(
    "segments,state",
    [(2, "per_row"), (3, "none"), (4, "shared"), (7, "per_row")],
)
def test_values_and_gradients_match_the_recurrence(segments, state):
    # T = 50: every K above leaves a padded last segment except 2.
    b, t, h, n = 2, 50, 2, 8
    inputs = list(random_inputs(b, t, h, n, seed=segments))
    if state == "shared":
        inputs[5] = inputs[5][:1]
    rng = np.random.default_rng(segments + 1)
    gy = rng.standard_normal((b, t, h, n))
    gs = rng.standard_normal((b, h, n, n))

    def loss(r, k, v, log_w, u, s0=None):
        y, s = time_split.split_over_time(
            python_wkv, r, k, v, log_w, u, s0, segments
        )
        return ops.sum(y * ops.convert_to_tensor(gy, "float32")) + ops.sum(
            s * ops.convert_to_tensor(gs, "float32")
        )

    args = inputs if state != "none" else inputs[:5]
    _, grads = value_and_grad(loss, args, jit=True)
    y, s = assert_gradients_match_recurrence(grads, args, gy, gs)

    y_got, s_got = compiled(
        lambda *a: time_split.split_over_time(python_wkv, *a, segments)
    )(*inputs[:5], args[5] if state != "none" else None)
    assert y_got.shape == (b, t, h, n)
    assert relative_error(ops.convert_to_numpy(y_got), y) <= FWD_TOL
    assert relative_error(ops.convert_to_numpy(s_got), s) <= FWD_TOL


def test_the_kernel_sees_segments_as_rows():
    seen = []

    def spy(r, k, v, log_w, u, initial_state):
        seen.append((tuple(r.shape), tuple(initial_state.shape)))
        return python_wkv(r, k, v, log_w, u, initial_state)

    inputs = random_inputs(3, 40, 2, 8, seed=1)
    compiled(lambda *a: time_split.split_over_time(spy, *a, segments=4))(
        *inputs
    )
    assert seen == [((12, 10, 2, 8), (12, 2, 8, 8))]
    seen.clear()
    compiled(lambda *a: time_split.split_over_time(spy, *a, segments=1))(
        *inputs
    )
    assert seen == [((3, 40, 2, 8), (3, 2, 8, 8))]


def test_strong_decay_stays_finite():
    # w_raw = 5: log_w = -148 a step, so a segment's total decay underflows
    # to exactly zero; the split must not turn that into inf or NaN, nor
    # add error to what the unsplit op gives.
    r, k, v, _, u, s0 = random_inputs(1, 512, 2, 8, seed=3)
    log_w = np.full(r.shape, -np.exp(5.0), np.float32)
    y, s = compiled(
        lambda *a: time_split.split_over_time(python_wkv, *a, segments=8)
    )(r, k, v, log_w, u, s0)
    y_one, s_one = compiled(python_wkv)(r, k, v, log_w, u, s0)
    assert np.isfinite(ops.convert_to_numpy(y)).all()
    assert np.isfinite(ops.convert_to_numpy(s)).all()
    y_one, s_one = ops.convert_to_numpy(y_one), ops.convert_to_numpy(s_one)
    assert relative_error(ops.convert_to_numpy(y), y_one) <= 1e-6
    assert relative_error(ops.convert_to_numpy(s), s_one) <= 1e-6


def test_segment_count_rule(monkeypatch):
    monkeypatch.delenv(time_split.SEGMENTS_ENV_VAR, raising=False)
    most, target = time_split.SPLIT_AT_MOST, time_split.TARGET_CHAINS
    shortest = time_split.MIN_SEGMENT
    # Enough chains already, or too short to cut: no split.
    assert time_split.segment_count(most + 1, 4096, 1) == 1
    assert time_split.segment_count(8, 4096, 32) == 1
    assert time_split.segment_count(1, 2 * shortest - 1, 1) == 1
    # Batch 1, 32 heads, 4096 steps: 16 segments of 256 reach 512 chains.
    k = time_split.segment_count(1, 4096, 32)
    assert 32 * k >= target and 32 * k // 2 < target
    # Capped by the segment length.
    assert time_split.segment_count(1, 4 * shortest, 1) == 4


def test_the_parallel_form_is_not_split(monkeypatch):
    # It already runs every chunk at once; a forced count still applies.
    monkeypatch.delenv(time_split.SEGMENTS_ENV_VAR, raising=False)
    monkeypatch.delenv("KERAS_RWKV_WKV6_FORM", raising=False)
    assert time_split.segment_count(1, 4096, 32) > 1
    monkeypatch.setenv("KERAS_RWKV_WKV6_FORM", "parallel")
    assert time_split.segment_count(1, 4096, 32) == 1
    monkeypatch.setenv("KERAS_RWKV_WKV6_SEGMENTS", "4")
    assert time_split.segment_count(1, 4096, 32) == 4


def test_segment_count_sees_each_devices_shard(monkeypatch):
    """Under a distribution the rule counts the chains of one device: the
    batch over the batch axis, the heads over the model axis."""
    import keras

    monkeypatch.delenv(time_split.SEGMENTS_ENV_VAR, raising=False)
    # Real distribution objects over named devices; only their meshes are
    # read, so they need not exist here.
    devices = [f"cpu:{i}" for i in range(8)]
    dp = keras.distribution.DataParallel(
        device_mesh=keras.distribution.DeviceMesh((8,), ("batch",), devices)
    )
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), devices)
    mp = keras.distribution.ModelParallel(
        layout_map=keras.distribution.LayoutMap(mesh), batch_dim_name="batch"
    )
    alone = time_split.segment_count(1, 4096, 32)
    current = keras.distribution
    # 8 rows over 8 devices: one row, 32 heads each, as alone.
    monkeypatch.setattr(current, "distribution", lambda: dp)
    assert time_split.segment_count(8, 4096, 32) == alone
    # 2 rows over batch = 2, 128 heads over model = 4: 1 x 32 each.
    monkeypatch.setattr(current, "distribution", lambda: mp)
    assert time_split.segment_count(2, 4096, 128) == alone
    # 8 rows x 32 heads: too many chains for one device to split, but
    # under the (2, 4) mesh each device has 4 x 8 of them.
    assert time_split.segment_count(8, 4096, 32) == 16
    monkeypatch.setattr(current, "distribution", lambda: None)
    assert time_split.segment_count(8, 4096, 32) == 1


def test_segment_count_env_var(monkeypatch):
    monkeypatch.setenv(time_split.SEGMENTS_ENV_VAR, "3")
    assert time_split.segment_count(64, 100, 32) == 3
    monkeypatch.setenv(time_split.SEGMENTS_ENV_VAR, "1000")
    assert time_split.segment_count(1, 100, 32) == 100
    for bad in ("0", "x", "-2"):
        monkeypatch.setenv(time_split.SEGMENTS_ENV_VAR, bad)
        with pytest.raises(ValueError, match="positive integer"):
            time_split.segment_count(1, 100, 32)
