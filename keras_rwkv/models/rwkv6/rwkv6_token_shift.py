"""Token shift with padding: which earlier activation each token mixes with.

RWKV mixes every token with the previous token's (layer-normed) input. With
padding, "previous" means the previous *real* token, or the carried shift
state when there is none, so pads never leak into the state or into real
tokens, wherever they are (left padding for generation, right padding for
training).

The indices are computed once per call of the backbone and shared by all
layers; index 0 means "the carried shift state", index t + 1 means token t.
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
    extended = ops.concatenate(
        [ops.cast(shift_state, x.dtype)[:, None, :], x], axis=1
    )
    previous = ops.take_along_axis(extended, prev_index[:, :, None], axis=1)
    new_state = ops.take_along_axis(extended, last_index[:, None, None], axis=1)
    return previous, new_state[:, 0]
