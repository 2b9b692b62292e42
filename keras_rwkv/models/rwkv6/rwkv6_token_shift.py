"""Token shift with padding: which earlier activation each token mixes with.

RWKV mixes every token with the previous token's (layer-normed) input. With
padding, "previous" means the previous *real* token, or the carried shift
state when there is none, so pads never leak into the state or into real
tokens, wherever they are (left padding for generation, right padding for
training).

The indices are computed once per call of the backbone and shared by all
layers; index 0 means "the carried shift state", index t + 1 means token t.

When every row's real tokens are one contiguous run (no padding, left or
right padding: all that generation and the preprocessors produce), the
previous token is the plain shift, the carried state or the last real
token, picked elementwise. Only other patterns take the general gather,
whose gradient is a scatter-add over the whole `[B, T, C]` activation:
serialized atomics on a GPU, ~0.5 ms a call for 7B at T = 4096.
"""

from keras import ops


def shift_indices(padding_mask):
    """Gather indices for the token shift.

    Args:
        padding_mask: `[B, T]` tensor, nonzero for real tokens.

    Returns:
        `(prev_index [B, T], last_index [B])` int32: for every position, the
        index of the previous real token (or 0 for the carried state), and
        the index of the last real token (or 0).
    """
    mask = ops.cast(ops.not_equal(padding_mask, 0), "int32")
    positions = ops.cumsum(ops.ones_like(mask), axis=1)  # 1, 2, ..., T
    last_real = ops.associative_scan(ops.maximum, mask * positions, axis=1)
    prev_index = ops.concatenate(
        [ops.zeros_like(last_real[:, :1]), last_real[:, :-1]], axis=1
    )
    return prev_index, last_real[:, -1]


def token_shift(x, shift_state, prev_index, last_index):
    """The previous-token input of every position, and the new shift state.

    Args:
        x: `[B, T, C]` layer-normed activations.
        shift_state: `[B, C]` carried activation of the token before `x`.
        prev_index, last_index: from `shift_indices`.

    Returns:
        `(previous [B, T, C], new_shift_state [B, C])`.
    """
    if x.shape[1] is not None:
        # TensorFlow's associative scan (in `shift_indices`) loses the
        # static shape, which the gathers below need.
        prev_index = ops.reshape(prev_index, (-1, x.shape[1]))
        last_index = ops.reshape(last_index, (-1,))
    state = ops.cast(shift_state, x.dtype)
    extended = ops.concatenate([state[:, None, :], x], axis=1)
    # One row a batch: its gradient is cheap, unlike the general gather's.
    new_state = ops.take_along_axis(
        extended, last_index[:, None, None], axis=1
    )[:, 0]
    if x.shape[1] == 1:
        # A decoding step: the one token's previous is always the carried
        # state. Known from the static shape, so the step has no branch
        # (and, on torch, no device sync per layer for `cond`).
        return state[:, None, :], new_state
    positions = ops.arange(ops.shape(x)[1], dtype="int32")[None, :]
    prev_index = ops.cast(prev_index, "int32")
    is_plain = ops.equal(prev_index, positions)  # token t - 1 (or state)
    is_state = ops.equal(prev_index, 0)
    is_last = ops.equal(prev_index, ops.cast(last_index, "int32")[:, None])

    def contiguous():
        previous = ops.where(
            is_plain[..., None], extended[:, :-1], new_state[:, None, :]
        )
        return ops.where(is_state[..., None], state[:, None, :], previous)

    def general():
        return ops.take_along_axis(extended, prev_index[:, :, None], axis=1)

    every_run_contiguous = ops.all(is_plain | is_state | is_last)
    previous = ops.cond(every_run_contiguous, contiguous, general)
    return previous, new_state
