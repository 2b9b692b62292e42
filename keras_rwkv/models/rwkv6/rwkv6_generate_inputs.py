"""What `generate` and `prefill` accept, checked at the boundary: prompts
(strings or token ids with a mask) and stop ids, with errors that name the
bad value."""

import numpy as np
from keras import ops

PROMPT_KINDS = (
    "a string, a list of strings, or token ids "
    "{'token_ids': [B, T], 'padding_mask': [B, T]}"
)


def _as_numpy(x, what):
    try:
        return np.asarray(ops.convert_to_numpy(x))
    except Exception as e:  # noqa: BLE001 - any unconvertible input
        raise ValueError(f"{what} is not an array: {e}") from None


def _check_ids(values, vocabulary_size, what):
    """Integer ids in [0, vocabulary_size)."""
    values = np.asarray(values)
    if values.size == 0:
        return
    if not np.issubdtype(values.dtype, np.integer):
        if not (
            np.issubdtype(values.dtype, np.floating)
            and np.all(np.isfinite(values))
            and np.all(values == np.round(values))
        ):
            raise ValueError(f"{what} must be integer token ids.")
    bad = values[(values < 0) | (values >= vocabulary_size)]
    if bad.size:
        raise ValueError(
            f"{what}: id {int(bad.flat[0])} is outside this model's "
            f"vocabulary (ids 0 to {vocabulary_size - 1})."
        )


def prompt_rows(inputs, tokenizer, vocabulary_size):
    """Prompts as lists of ids, and whether the input was one prompt.

    Args:
        inputs: see `PROMPT_KINDS`.
        tokenizer: the preprocessor's tokenizer, or None.
        vocabulary_size: the model's vocabulary size.
    """
    if isinstance(inputs, dict):
        if "token_ids" not in inputs:
            raise ValueError(
                f"Token-id inputs need 'token_ids'; pass {PROMPT_KINDS}."
            )
        ids = _as_numpy(inputs["token_ids"], "token_ids")
        if ids.ndim not in (1, 2):
            raise ValueError(
                f"token_ids must be [T] or [B, T]; got shape {ids.shape}."
            )
        scalar = ids.ndim == 1
        ids = ids[None] if scalar else ids
        mask = inputs.get("padding_mask")
        if mask is None:
            mask = np.ones_like(ids, bool)
        else:
            mask = _as_numpy(mask, "padding_mask").astype(bool)
            mask = mask[None] if mask.ndim == 1 else mask
            if mask.shape != ids.shape:
                raise ValueError(
                    f"padding_mask has shape {mask.shape}, token_ids "
                    f"{ids.shape}: they must match."
                )
        _check_ids(ids[mask], vocabulary_size, "token_ids")
        return [r[m].astype(int).tolist() for r, m in zip(ids, mask)], scalar
    if inputs is None:
        raise ValueError(f"generate() needs a prompt: {PROMPT_KINDS}.")
    if tokenizer is None:
        raise ValueError(
            "This RWKV6CausalLM has no preprocessor, so generate() takes "
            "token ids: {'token_ids': ..., 'padding_mask': ...}."
        )
    if isinstance(inputs, np.ndarray):
        inputs = inputs.tolist()
    scalar = isinstance(inputs, str)
    texts = [inputs] if scalar else list(inputs)
    if not all(isinstance(t, str) for t in texts):
        raise ValueError(f"generate() takes {PROMPT_KINDS}.")
    if not texts:
        return [], scalar
    return tokenizer(texts), scalar


def stop_ids(stop_token_ids, tokenizer, vocabulary_size):
    """`"auto"`, None or a list of ids, as a tuple of ids or None."""
    if isinstance(stop_token_ids, str):
        if stop_token_ids != "auto":
            raise ValueError(
                f"stop_token_ids={stop_token_ids!r}: use 'auto' (the end "
                "token), None (no stop) or a list of token ids."
            )
        if tokenizer is None:
            raise ValueError(
                'stop_token_ids="auto" needs a preprocessor; pass '
                "stop_token_ids=None (run to max length) or a list of ids."
            )
        return (tokenizer.end_token_id,)
    if stop_token_ids is None:
        return None
    try:
        values = np.asarray(list(stop_token_ids))
    except TypeError:
        raise ValueError(
            f"stop_token_ids={stop_token_ids!r}: use 'auto', None or a list "
            "of token ids."
        ) from None
    _check_ids(values, vocabulary_size, "stop_token_ids")
    return tuple(int(t) for t in values)


def new_token_counts(lengths, max_length, max_new_tokens, preprocessor):
    """How many new tokens each row may get (rows of `lengths` prompt
    tokens), from `generate`'s `max_length` or `max_new_tokens`;
    `max_length` defaults to the preprocessor's `sequence_length`."""
    if max_new_tokens is not None:
        if max_length is not None:
            raise ValueError("Pass max_length or max_new_tokens, not both.")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1.")
        return [int(max_new_tokens)] * len(lengths)
    if max_length is None:
        if preprocessor is None:
            raise ValueError(
                "Pass max_length or max_new_tokens (there is no "
                "preprocessor to take a default sequence_length from)."
            )
        max_length = preprocessor.sequence_length
    longest = max(lengths)
    if max_length <= longest:
        raise ValueError(
            f"max_length={max_length} leaves no room to generate: the "
            f"longest prompt has {longest} tokens and max_length counts "
            "the prompt too. Raise max_length or use max_new_tokens."
        )
    return [int(max_length - n) for n in lengths]
