"""The decoding loop of `RWKV6CausalLM.generate`, and its token buffer.

The token buffer is `[B, W]` int32 with `W = P + budget + 1`: the prompts
left-padded in columns `[0, P)`, generation slots from column `P`, one
scratch column. Every id not (yet) a real token is -1, so a buffer is its
own mask: pads, unwritten slots and everything after a row's end are -1.

`decode_steps` runs the loop from a column `index` up to `segment_end` (a
runtime value, so one compiled program serves every segment): each step
feeds the token at `index - 1` (masked when it is -1, which leaves the
state untouched), picks the next token with the KerasHub sampler's public
step API (`compute_probabilities`, `get_next_token`, `run_loop`) and writes
it (on torch the loop is Python's, reading the device every few steps:
`_host_loop`). A row ends after its stop token or its last slot has been
*fed*, so the state the loop carries covers exactly each row's output. The
state stays inside the loop, unlike KerasHub's `Sampler.__call__`, which
drops its cache; and no host callback runs inside, so the compiled program
can be kept in JAX's persistent compilation cache. Streaming is segment by
segment on the host.

Samplers that run a loop of their own (beam search) go through
`sampler_loop` instead: KerasHub's `Sampler.__call__`, with the slots past
each row's limit protected.
"""

import keras
import numpy as np
from keras import ops
from keras_hub.samplers import Sampler

from keras_rwkv.models.rwkv6.rwkv6_state import RWKV6State
from keras_rwkv.models.rwkv6.rwkv6_torch_step import compiling
from keras_rwkv.models.rwkv6.rwkv6_torch_step import step_function
from keras_rwkv.samplers.penalty_sampler import PenaltySampler


def left_pad(rows, length, width=None, fill=0):
    """Prompts left-padded into `[len(rows), width]` int32 (`width`
    defaults to `length`); the real tokens end at column `length - 1`."""
    width = width or length
    ids = np.full((len(rows), width), fill, "int32")
    for i, row in enumerate(rows):
        if len(row):
            ids[i, length - len(row) : length] = row
    return ids


def kept_mask(tokens, prompt_len, stop_ids):
    """`[B, W]` bool: the real tokens of each row's output (prompt, then
    generated up to and including its first stop token)."""
    tokens = np.asarray(tokens)
    kept = tokens >= 0
    if stop_ids:
        generated = np.arange(tokens.shape[1])[None] >= prompt_len
        ends = np.isin(tokens, stop_ids) & generated & kept
        kept &= (np.cumsum(ends, axis=1) - ends) == 0
    return kept


def _picker(sampler):
    """`(penalties or None, the sampler that picks tokens)`."""
    if isinstance(sampler, PenaltySampler):
        return sampler, sampler.sampler
    return None, sampler


def has_own_loop(sampler):
    """Whether the sampler replaces KerasHub's step loop (beam search)."""
    _, picker = _picker(sampler)
    return type(picker).__call__ is not Sampler.__call__


def _is_stop(token, stops, after_prompt):
    """Whether each row's `token` is one of `stops` (a tensor, or None)
    and was fed after the prompt (`after_prompt`: a bool tensor, or in
    torch's host loop a Python bool, kept out of the ops)."""
    if stops is None or after_prompt is False:
        return ops.zeros_like(token, "bool")
    hit = ops.any(ops.equal(token[:, None], stops[None, :]), axis=1)
    return hit if after_prompt is True else ops.logical_and(hit, after_prompt)


def decode_steps(
    lm,
    tokens,
    state,
    index,
    finished,
    segment_end,
    row_end,
    prompt_len,
    stop_ids,
):
    """Decodes columns `index ..` until `segment_end` or every row ended.

    Args:
        lm: the `RWKV6CausalLM` (its sampler and `call_with_state`, or
            on torch with `jit_compile=True` the compiled step of
            `rwkv6_torch_step.py`).
        tokens: `[B, W]` int32 token buffer.
        state: the `RWKV6State` after the tokens before column `index - 1`.
        index: int32 scalar, the column to write next.
        finished: `[B]` bool, rows that have ended.
        segment_end: int32 scalar, stop before writing this column.
        row_end: `[B]` int32, one past each row's last slot.
        prompt_len: int, the first generation column `P`.
        stop_ids: tuple of ids or None.

    Returns:
        `(tokens, state, index, finished)` where the loop stopped.
    """
    penalties, picker = _picker(lm.sampler)
    step = step_function(lm)
    width = tokens.shape[1]
    prompt_mask = ops.arange(width, dtype="int32")[None, :] < prompt_len
    row_end = ops.cast(row_end, "int32")
    # Constants made once, as tensors: on torch a host number or array
    # given to an op is copied to the device, and waited for, each step.
    stops = (
        ops.convert_to_tensor(np.asarray(stop_ids, "int32"))
        if stop_ids
        else None
    )
    zero, no_token = (ops.convert_to_tensor(v, "int32") for v in (0, -1))

    def cond(tokens, state, index, finished):
        return ops.logical_and(
            index < segment_end, ops.logical_not(ops.all(finished))
        )

    def body(tokens, state, index, finished):
        # `state` is the per-layer list inside the loop (see
        # `RWKV6Backbone.call_with_state`).
        rows = ops.shape(tokens)[0]
        fed = ops.slice(tokens, [0, index - 1], [rows, 1])
        logits, _, state = step(
            ops.maximum(fed, zero), ops.cast(fed >= 0, "int32"), state
        )
        logits = logits[:, 0]
        if penalties is not None:
            logits = penalties.penalize(
                logits, tokens, index, prompt_len, prompt_mask
            )
        probabilities = picker.compute_probabilities(logits)
        token = ops.cast(picker.get_next_token(probabilities), "int32")
        # A row ends once its stop token or its last slot has been fed.
        ended = ops.logical_or(
            _is_stop(fed[:, 0], stops, index > prompt_len), index >= row_end
        )
        finished = ops.logical_or(finished, ended)
        token = ops.where(finished, no_token, token)
        tokens = ops.slice_update(tokens, [0, index], token[:, None])
        return tokens, state, index + 1, finished

    if keras.config.backend() == "torch":
        tokens, layers, index, finished = _host_loop(
            body, tokens, state.layers(), index, finished, segment_end
        )
    else:
        tokens, layers, index, finished = lm.sampler.run_loop(
            cond,
            body,
            model=lm,
            loop_vars=(
                tokens,
                state.layers(),
                ops.cast(index, "int32"),
                ops.cast(finished, "bool"),
            ),
        )
    return tokens, RWKV6State.from_layers(layers), index, finished


# How many steps the torch loop runs between two reads of whether every
# row has ended.
CHECK_EVERY = 8


def _host_loop(body, tokens, layers, index, finished, segment_end):
    """The loop as torch runs it, in Python, without reading the device
    each step: the column index stays a host int (so a step slices and
    writes the buffer with plain indices, where a device index is a sync
    each), and whether every row has ended is read every `CHECK_EVERY`
    steps. Steps past the end change nothing: an ended row is fed pads,
    which leave its state as it was, and gets -1 written."""
    index, end = int(index), int(segment_end)
    finished = ops.cast(finished, "bool")
    if bool(ops.all(finished)):
        return tokens, layers, index, finished
    steps = 0
    while index < end:
        tokens, layers, index, finished = body(tokens, layers, index, finished)
        steps += 1
        if steps % CHECK_EVERY == 0 and bool(ops.all(finished)):
            break
    return tokens, layers, index, finished


def sampler_loop(lm, tokens, state, row_end, prompt_len, stop_ids):
    """The whole generation with the sampler's own loop (beam search).

    KerasHub's loop runs to the end of the buffer; the slots past each
    row's limit are protected (kept at -1, read as pads).

    Returns:
        The `[B, W]` token buffer (after a row's stop token it may hold
        more tokens: `kept_mask` drops them).
    """
    width = tokens.shape[1]
    columns = ops.arange(width, dtype="int32")[None, :]
    row_end = ops.cast(row_end, "int32")[:, None]
    protected = ops.logical_or(columns < prompt_len, columns >= row_end)

    # On torch with `jit_compile=True`, the compiled decoding step, which
    # carries the state as its per-layer list (the beams' reordering makes
    # it a new one each step: copied into the program's buffers).
    step = step_function(lm)
    if compiling(lm) and isinstance(state, RWKV6State):
        state = state.layers()

    def next(tokens, state, index):
        rows = ops.shape(tokens)[0]
        fed = ops.slice(tokens, [0, index - 1], [rows, 1])
        logits, hidden, state = step(
            ops.maximum(fed, 0), ops.cast(fed >= 0, "int32"), state
        )
        return logits[:, 0], None if hidden is None else hidden[:, 0], state

    return lm.sampler(
        next=next,
        prompt=tokens,
        cache=state,
        index=prompt_len,
        mask=protected,
        stop_token_ids=stop_ids,
        model=lm,
    )
