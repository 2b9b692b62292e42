"""WKV6 split over time: K segments of a sequence as K independent rows.

A recurrent kernel works through each (batch row, head) as one chain of T
dependent steps, so at small batch the GPU runs few chains, each as long
as the sequence (1 x 32 heads of a 1.6B model: 32 chains for 132 SMs;
under tensor parallelism each GPU has fewer heads and the same T). Here
the sequence is cut into K segments of L = T / K steps and the kernel
runs them as K x more rows of L steps:

1. Each segment's own contribution to the state, started from zero, is
   a matmul: `KV_c = sum_s (k_s * exp(D_s))ᵀ v_s` (D_s = the log decay
   of the steps after s to the segment's end, <= 0), and its total decay
   is the exp of its summed log decay.
2. The state entering segment c is `S_c = d_{c-1} * S_{c-1} + KV_{c-1}`
   (associative scan over segments, from the given initial state).
3. The kernel runs every segment from its entering state: outputs, and
   the final state from the last segment.

The result is the same recurrence (float32 states throughout); the extra
work is one matmul over the sequence. Gradients flow through the kernel's
own VJP (initial-state gradient included), the scan and the matmul.
"""

import math

import keras
from keras import ops

from keras_rwkv.ops.wkv6.python import chain_states
from keras_rwkv.ops.wkv6.python import einsum_f32
from keras_rwkv.ops.wkv6.python import full_state
from keras_rwkv.utils import settings

SEGMENTS_ENV_VAR = settings.WKV_SEGMENTS_ENV_VAR
# Measured on H100 (benchmarks/RESULTS.md, "WKV split over time"): with 16
# to 64 chains a device (batch x heads), splitting up to ~512 chains made
# forward + backward 1.4-3.9x faster; at 256 chains (batch 8 x 32 heads)
# the kernel already fills the GPU and a split cost 25%.
SPLIT_AT_MOST = 64
TARGET_CHAINS = 512
# Never cut segments shorter than this: the per-segment matmul and the
# state traffic (N x N floats per segment) must stay small next to the
# recurrence itself.
MIN_SEGMENT = 128


def _per_device(batch, num_heads):
    """(batch, heads) on each device under the current distribution.

    Under `jit` the op sees global shapes; the kernel runs on each
    device's shard: the batch split over the distribution's batch axis
    and (ModelParallel with `RWKV6Backbone.get_layout_map`) the heads over
    the other axes.
    """
    distribution = keras.distribution.distribution()
    if distribution is None:
        return batch, num_heads
    mesh = distribution.device_mesh
    sizes = dict(zip(mesh.axis_names, mesh.shape))
    data = sizes.get(getattr(distribution, "batch_dim_name", None), 1)
    model = max(1, math.prod(sizes.values()) // data)
    return max(1, batch // data), max(1, num_heads // model)


def segment_count(batch, seq_len, num_heads):
    """How many time segments `split_over_time` should use.

    With at most `SPLIT_AT_MOST` chains (batch x heads) a device, the
    smallest power of two K that makes `TARGET_CHAINS`, as long as
    segments keep at least `MIN_SEGMENT` steps; otherwise 1 (no split).
    The `KERAS_RWKV_WKV6_SEGMENTS` environment variable forces K (capped
    at the sequence length). The chunk-parallel form
    (`KERAS_RWKV_WKV6_FORM=parallel`) already runs every chunk at once,
    so under it nothing is split unless forced.

    Args:
        batch, seq_len, num_heads: ints, the op's (global) shape.

    Returns:
        int >= 1.
    """
    forced = settings.wkv_segments()
    if forced is not None:
        return min(forced, seq_len)
    if settings.wkv6_launch()["form"] == settings.WKV6_FORMS["parallel"]:
        return 1
    batch, num_heads = _per_device(batch, num_heads)
    chains = batch * num_heads
    segments = 1
    if chains > SPLIT_AT_MOST:
        return segments
    while (
        chains * segments < TARGET_CHAINS
        and seq_len // (2 * segments) >= MIN_SEGMENT
    ):
        segments *= 2
    return segments


def split_over_time(wkv_fn, r, k, v, log_w, u, initial_state, segments):
    """Runs `wkv_fn` on `segments` time segments as extra batch rows.

    Args:
        wkv_fn: `(r, k, v, log_w, u, initial_state) -> (y, final_state)`
            with the contract of `keras_rwkv.ops.wkv6.wkv6`, taking an
            initial state per row.
        r, k, v, log_w: `[B, T, H, N]` tensors.
        u: `[H, N]`.
        initial_state: float32 `[B or 1, H, N, N]` or `None`.
        segments: int, K >= 1. T need not divide by K: the last segment
            is padded with steps that leave the state alone.

    Returns:
        `(y [B, T, H, N] in r's dtype, final_state float32 [B, H, N, N])`.
    """
    batch, seq_len, num_heads, head_size = r.shape
    if segments <= 1:
        return wkv_fn(r, k, v, log_w, u, initial_state)
    length = -(-seq_len // segments)
    pad = segments * length - seq_len
    if pad:
        # k = 0 adds nothing and log_w = 0 decays nothing: the padded steps
        # carry the state through unchanged; their outputs are dropped.
        widths = [[0, 0], [0, pad], [0, 0], [0, 0]]
        r, k, v, log_w = (ops.pad(x, widths) for x in (r, k, v, log_w))

    def split(x, dtype=None):
        # [B, K*L, H, N] -> [B, K, L, H, N]: a reshape, no data movement.
        x = x if dtype is None else ops.cast(x, dtype)
        return ops.reshape(x, (batch, segments, length, num_heads, head_size))

    # Log decay from each step to the segment's end, summed from the end:
    # a cumulative sum from the start would leave the late steps (the ones
    # that survive the decay) as differences of large numbers.
    log_w = split(log_w, "float32")
    from_step = ops.flip(ops.cumsum(ops.flip(log_w, 2), axis=2), 2)
    k_to_end = split(k, "float32") * ops.exp(from_step - log_w)
    local = einsum_f32(
        "bklhi,bklhj->bkhij", k_to_end, split(v, "float32")
    )  # [B, K, H, N, N]
    decay = ops.exp(from_step[:, :, 0])  # [B, K, H, N]

    state = full_state(initial_state, batch, num_heads, head_size)
    ends = chain_states(decay[:, :-1], local[:, :-1], state, axis=1)
    starts = ops.concatenate([state[:, None], ends], axis=1)

    rows = batch * segments

    def fold(x):
        return ops.reshape(x, (rows, length, num_heads, head_size))

    y, finals = wkv_fn(
        fold(r),
        fold(k),
        fold(v),
        fold(log_w),  # float32 now, as the kernels want it
        u,
        ops.reshape(starts, (rows, num_heads, head_size, head_size)),
    )
    y = ops.reshape(y, (batch, segments * length, num_heads, head_size))
    if pad:
        y = y[:, :seq_len]
    finals = ops.reshape(
        finals, (batch, segments, num_heads, head_size, head_size)
    )
    return y, finals[:, -1]
