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

Indices are compared with `zeros_like`, not the number 0: on torch a number
given to an op is a blocking copy to the device, a wait for it each layer.
"""

import keras
from keras import ops

from keras_rwkv.utils.scan import associative_scan


def shift_indices(padding_mask):
    """Gather indices for the token shift.

    Args:
        padding_mask: `[B, T]` tensor, nonzero for real tokens.

    Returns:
        `(prev_index [B, T], last_index [B])` int32: for every position, the
        index of the previous real token (or 0 for the carried state), and
        the index of the last real token (or 0).
    """
    mask = ops.cast(ops.cast(padding_mask, "bool"), "int32")
    positions = ops.cumsum(ops.ones_like(mask), axis=1)  # 1, 2, ..., T
    last_real = associative_scan(ops.maximum, mask * positions, axis=1)
    prev_index = ops.concatenate(
        [ops.zeros_like(last_real[:, :1]), last_real[:, :-1]], axis=1
    )
    return prev_index, last_real[:, -1]


def _static(prev_index, last_index, length):
    """The indices with their static shape, which TensorFlow's associative
    scan (in `shift_indices`) loses and the gathers need."""
    if length is None:
        return prev_index, last_index
    return (
        ops.reshape(prev_index, (-1, length)),
        ops.reshape(last_index, (-1,)),
    )


def runs_contiguous(prev_index, last_index, length):
    """Whether every row's real tokens are one contiguous run, given
    `shift_indices`' output for `length` tokens: a bool scalar tensor, or
    on torch a Python bool, so that a forward pass syncs with the device
    once for it rather than once a layer (and a compiled graph breaks
    once)."""
    prev_index, last_index = _static(prev_index, last_index, length)
    prev_index = ops.cast(prev_index, "int32")
    positions = ops.arange(ops.shape(prev_index)[1], dtype="int32")[None, :]
    last = ops.cast(last_index, "int32")[:, None]
    flag = ops.all(
        ops.equal(prev_index, positions)
        | ops.equal(prev_index, ops.zeros_like(prev_index))
        | ops.equal(prev_index, last)
    )
    if keras.config.backend() == "torch":
        return bool(flag)
    return flag


def mask_contiguous(padding_mask):
    """`runs_contiguous(*shift_indices(padding_mask), T)` from the mask
    alone, in a handful of ops rather than a scan: a row is one run when
    its mask rises from 0 to 1 at most once (counting a 0 before it). On
    torch this is host work before a training step's forward pass, while
    the device waits; the answer is a Python bool there too."""
    mask = ops.cast(ops.cast(padding_mask, "bool"), "int32")
    before = ops.concatenate([ops.zeros_like(mask[:, :1]), mask[:, :-1]], 1)
    rises = ops.sum(ops.cast(ops.greater(mask, before), "int32"), axis=1)
    flag = ops.all(ops.less_equal(rises, ops.ones_like(rises)))
    if keras.config.backend() == "torch":
        return bool(flag)
    return flag


def token_shift(x, shift_state, prev_index, last_index, contiguous=None):
    """The previous-token input of every position, and the new shift state.

    Args:
        x: `[B, T, C]` layer-normed activations.
        shift_state: `[B, C]` carried activation of the token before `x`.
        prev_index, last_index: from `shift_indices`.
        contiguous: `runs_contiguous(prev_index, last_index, T)`,
            computed here if `None`.

    Returns:
        `(previous [B, T, C], new_shift_state [B, C])`.
    """
    prev_index, last_index = _static(prev_index, last_index, x.shape[1])
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
    if contiguous is None:
        contiguous = runs_contiguous(prev_index, last_index, x.shape[1])
    positions = ops.arange(ops.shape(x)[1], dtype="int32")[None, :]
    prev_index = ops.cast(prev_index, "int32")

    def plain():
        is_plain = ops.equal(prev_index, positions)  # token t - 1 (or state)
        is_state = ops.equal(prev_index, ops.zeros_like(prev_index))
        previous = ops.where(
            is_plain[..., None], extended[:, :-1], new_state[:, None, :]
        )
        return ops.where(is_state[..., None], state[:, None, :], previous)

    def general():
        return ops.take_along_axis(extended, prev_index[:, :, None], axis=1)

    if isinstance(contiguous, bool):
        return (plain() if contiguous else general()), new_state
    return ops.cond(contiguous, plain, general), new_state
