"""The WKV6 recurrence in plain `keras.ops`: a chunked-parallel form and a
single step. Runs (and differentiates) on every Keras backend.

Per head, with a state `S` of shape [N_key, N_value]:

    y_t = r_t (diag(u) k_tᵀ v_t + S)
    S   ← diag(exp(log_w_t)) S + k_tᵀ v_t

The chunked form splits time into chunks of `chunk_size`. Inside a chunk
every pairwise decay `exp(A_{t-1} - A_s)` (A = inclusive cumulative log
decay, s < t) is formed explicitly, so each factor is <= 1 and nothing can
overflow however strong the decay is (the usual `r·exp(A)` / `k·exp(-A)`
factorisation overflows once 16·e^{w_raw} > 88, i.e. w_raw ≈ 1.7, with
chunks of 16). Between chunks only the state is passed on, with an
associative scan over chunks.
"""

import keras
from keras import ops

from keras_rwkv.utils.scan import associative_scan

DEFAULT_CHUNK_SIZE = 16


def einsum_f32(subscripts, *operands):
    """`ops.einsum` at full float32 precision on every backend.

    JAX lets XLA run float32 matmuls as TF32 on recent GPUs by default,
    which rounds to 10-bit mantissas (relative errors ~1e-3 in the WKV
    output); torch and CPUs compute float32 as float32.
    """
    if keras.config.backend() == "jax":
        return ops.einsum(subscripts, *operands, precision="highest")
    return ops.einsum(subscripts, *operands)


def full_state(initial_state, batch, num_heads, head_size):
    """The float32 state `[B, H, N, N]` a recurrence starts from: zeros for
    `None`, else `initial_state` (`[B or 1, H, N, N]`) broadcast over the
    batch."""
    shape = (batch, num_heads, head_size, head_size)
    if initial_state is None:
        return ops.zeros(shape, "float32")
    return ops.broadcast_to(ops.cast(initial_state, "float32"), shape)


def wkv6_step(r, k, v, log_w, u, state):
    """One token of the recurrence (T = 1).

    Args:
        r, k, v, log_w: float32 tensors `[B, 1, H, N]`.
        u: float32 `[H, N]`.
        state: float32 `[B, H, N, N]` (key, value).

    Returns:
        `(y [B, 1, H, N], new_state [B, H, N, N])`, both float32.
    """
    r, k, v, log_w = (x[:, 0] for x in (r, k, v, log_w))
    kv = k[..., :, None] * v[..., None, :]
    bonus = ops.sum(r * u * k, axis=-1, keepdims=True) * v
    y = einsum_f32("bhi,bhij->bhj", r, state) + bonus
    new_state = ops.exp(log_w)[..., None] * state + kv
    return y[:, None], new_state


def chain_states(decay, kv, state, axis):
    """The state at the end of every chunk, from the state before the first:
    `S_c = d_c * S_{c-1} + KV_c`, as an associative scan over chunks.

    Args:
        decay: `[..., C, ..., N]` float32, each chunk's total decay per key
            channel, the chunk axis at `axis`.
        kv: `[..., C, ..., N, N]` float32, each chunk's own contribution
            to the state (started from zero).
        state: the state before the first chunk: `kv`'s shape without the
            chunk axis.
        axis: int >= 0, the chunk axis.

    Returns:
        `[..., C, ..., N, N]`: the state after each chunk.
    """

    def combine(left, right):
        d_l, s_l = left
        d_r, s_r = right
        return d_l * d_r, d_r[..., None] * s_l + s_r

    decay_prod, kv_sum = associative_scan(combine, (decay, kv), axis=axis)
    return decay_prod[..., None] * ops.expand_dims(state, axis) + kv_sum


def wkv6_chunked(r, k, v, log_w, u, state, chunk_size=DEFAULT_CHUNK_SIZE):
    """The whole sequence in the chunked-parallel form.

    Args:
        r, k, v, log_w: float32 tensors `[B, T, H, N]`, T >= 1.
        u: float32 `[H, N]`.
        state: float32 `[B, H, N, N]` (key, value).
        chunk_size: int, the chunk length.

    Returns:
        `(y [B, T, H, N], final_state [B, H, N, N])`, both float32.
    """
    static_t = r.shape[1]
    if static_t is not None:
        chunk_size = max(1, min(chunk_size, static_t))
    batch = ops.shape(r)[0]
    seq_len = ops.shape(r)[1]
    num_heads, head_size = r.shape[2], r.shape[3]

    # Pad T up to a multiple of the chunk. Padded steps have k = 0 and
    # log_w = 0, so they leave the state untouched.
    pad = (-seq_len) % chunk_size
    if static_t is None or pad:
        widths = [[0, 0], [0, pad], [0, 0], [0, 0]]
        r, k, v, log_w = (ops.pad(x, widths) for x in (r, k, v, log_w))

    # A static chunk count where T is static: TensorFlow's associative
    # scan needs a static scan length when the batch is not.
    num_chunks = -1 if static_t is None else -(-static_t // chunk_size)

    def to_chunks(x):
        # [B, T, H, N] -> [B, H, C, L, N]
        shape = (batch, num_chunks, chunk_size, num_heads, head_size)
        x = ops.reshape(x, shape)
        return ops.transpose(x, (0, 3, 1, 2, 4))

    r, k, v, log_w = (to_chunks(x) for x in (r, k, v, log_w))

    a_incl = ops.cumsum(log_w, axis=3)  # A_t
    a_excl = a_incl - log_w  # A_{t-1}
    a_last = a_incl[:, :, :, -1:, :]  # A at the end of each chunk

    # Intra-chunk: pairwise decays for s < t, each exp(<= 0). Pairs with
    # s >= t are clamped to exp(0) and masked out of the scores below.
    idx = ops.arange(chunk_size)
    causal = ops.cast(idx[:, None] > idx[None, :], "float32")
    diff = a_excl[..., :, None, :] - a_incl[..., None, :, :]
    decay_ts = ops.exp(ops.minimum(diff, 0.0))
    scores = einsum_f32("bhctsi,bhcti,bhcsi->bhcts", decay_ts, r, k)
    bonus = ops.sum(r * u[None, :, None, None, :] * k, axis=-1)
    scores = scores * causal + bonus[..., None] * ops.eye(chunk_size)
    y = einsum_f32("bhcts,bhcsj->bhctj", scores, v)

    # Per chunk: its own contribution to the state and its total decay.
    k_to_end = k * ops.exp(a_last - a_incl)
    chunk_kv = einsum_f32("bhcli,bhclj->bhcij", k_to_end, v)
    chunk_decay = ops.exp(a_last[:, :, :, 0, :])  # [B, H, C, N]

    ends = chain_states(chunk_decay, chunk_kv, state, axis=2)
    starts = ops.concatenate([state[:, :, None], ends[:, :, :-1]], axis=2)

    # Inter-chunk: what the carried state contributes inside each chunk.
    y = y + einsum_f32("bhcli,bhcij->bhclj", r * ops.exp(a_excl), starts)

    y = ops.transpose(y, (0, 2, 3, 1, 4))
    y = ops.reshape(y, (batch, -1, num_heads, head_size))[:, :seq_len]
    return y, ends[:, :, -1]
