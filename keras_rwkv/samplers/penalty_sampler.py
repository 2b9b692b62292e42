import functools
import math
import numbers

import keras
import numpy as np
from keras import ops
from keras_hub.samplers import Sampler
from keras_hub.samplers import get as get_sampler
from keras_hub.samplers import serialize as serialize_sampler

# PIPELINE (rwkv.utils) gives tokens that decode to a substring of this
# string no frequency weight (they still get the presence penalty).
PIPELINE_UNWEIGHTED_TEXT = " \t0123456789"


def pipeline_unweighted_ids(tokenizer):
    """Ids that `rwkv.utils.PIPELINE` counts with frequency weight 0: tokens
    whose text is a substring of `" \\t0123456789"` (spaces, tabs, digit
    runs)."""
    ids = []
    for token_id, token in enumerate(tokenizer.get_vocabulary(), start=1):
        if isinstance(token, str) and token in PIPELINE_UNWEIGHTED_TEXT:
            ids.append(token_id)
    return ids


@keras.saving.register_keras_serializable(package="keras_rwkv")
class PenaltySampler(Sampler):
    """Adds repetition, presence and frequency penalties, a token ban and a
    temperature to any KerasHub sampler.

    The penalties are computed from the token buffer inside the compiled
    generation loop (nothing runs on the host): the prompt tokens are the
    positions the sampler's `mask` protects, except negative ids (padding);
    the generated ones are those written by the loop. Then the wrapped sampler
    (greedy, top-k, top-p, random, beam) picks the token. Use it the KerasHub
    way: `causal_lm.compile(sampler=PenaltySampler("top_p", ...))`.

    Rules, applied in this order to the logits of each step:

    1. Repetition penalty `p` (bert4keras3's `penalty`): with `c` the count
       of a token among the real tokens read so far (prompt included, pads
       never; only the last `penalty_window` of them if set), the logit
       becomes `logit / p**c` if positive, else `logit * p**c`.
       `max_penalty_range=(lo, hi)` ignores counts below `lo` and caps them
       at `hi`.
    2. Presence `α_p` and frequency `α_f` penalties over *generated* tokens
       (`rwkv.utils.PIPELINE`): `logit -= α_p + α_f * occ` for every token
       generated so far, where `occ` adds the token's weight each time it is
       generated and all of `occ` decays by `α_d` (`penalty_decay`) at each
       new token. Weights are 1, except 0 for `unweighted_ids` (by default
       for RWKV World: spaces, tabs and digit runs, as PIPELINE does).
    3. `token_ban`: these ids get logit -inf.
    4. `temperature`: logits are divided by it (the wrapped sampler's own
       temperature applies after, normally 1).

    Args:
        sampler: the sampler that picks tokens: a name ("greedy", "top_k",
            "top_p", "random", "beam"), a config dict or a `Sampler`.
        repetition_penalty: float >= 1 (1 disables).
        penalty_window: int or None. Count only the last N real tokens.
        max_penalty_range: `(lo, hi)` or None.
        presence_penalty: float α_p (0 disables).
        frequency_penalty: float α_f (0 disables).
        penalty_decay: float α_d in (0, 1].
        token_ban: ids never generated.
        unweighted_ids: `"world"` (PIPELINE's rule for the World
            vocabulary), or a list of ids, or None for no exception.
        temperature: float > 0.

    Examples:
    ```python
    lm.compile(sampler=keras_rwkv.samplers.PenaltySampler(
        "top_p", repetition_penalty=1.1, penalty_window=256,
        presence_penalty=0.2, frequency_penalty=0.2, penalty_decay=0.996,
    ))
    ```
    """

    def __init__(
        self,
        sampler="greedy",
        repetition_penalty=1.0,
        penalty_window=None,
        max_penalty_range=None,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        penalty_decay=1.0,
        token_ban=(),
        unweighted_ids="world",
        temperature=1.0,
    ):
        super().__init__(temperature=1.0)
        for name, value in (
            ("repetition_penalty", repetition_penalty),
            ("presence_penalty", presence_penalty),
            ("frequency_penalty", frequency_penalty),
            ("penalty_decay", penalty_decay),
            ("temperature", temperature),
        ):
            if not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(
                    f"{name} must be a finite number; got {value!r}."
                )
        if penalty_window is not None and (
            not isinstance(penalty_window, numbers.Integral)
            or isinstance(penalty_window, bool)
        ):
            raise ValueError(
                "penalty_window must be an int or None; got "
                f"{penalty_window!r}."
            )
        if repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0 (1 disables).")
        if temperature <= 0:
            raise ValueError("temperature must be > 0.")
        if not 0 < penalty_decay <= 1:
            raise ValueError("penalty_decay must be in (0, 1].")
        if penalty_window is not None and penalty_window < 1:
            raise ValueError("penalty_window must be >= 1 or None.")
        if max_penalty_range is not None:
            lo, hi = max_penalty_range
            if not 0 <= lo <= hi:
                raise ValueError("max_penalty_range must be (lo, hi), lo<=hi.")
            max_penalty_range = (int(lo), int(hi))
        self.sampler = get_sampler(sampler)
        if not isinstance(self.sampler, Sampler):
            raise ValueError(
                f"Unknown sampler {sampler!r}: use greedy, top_k, top_p, "
                "random, beam, or a keras_hub.samplers.Sampler."
            )
        if isinstance(self.sampler, PenaltySampler):
            raise ValueError("PenaltySampler cannot wrap another one.")
        self.repetition_penalty = float(repetition_penalty)
        self.penalty_window = penalty_window
        self.max_penalty_range = max_penalty_range
        self.presence_penalty = float(presence_penalty)
        self.frequency_penalty = float(frequency_penalty)
        self.penalty_decay = float(penalty_decay)
        self.token_ban = [int(t) for t in token_ban]
        self.unweighted_ids = unweighted_ids
        self.penalty_temperature = float(temperature)

    def _id_table(self, ids, vocab):
        """`_id_table_array` as a tensor, made once per table (on torch a
        copy to the device and a wait, were it made each step); a NumPy
        constant in a traced program."""
        key = (tuple(ids), vocab)
        if keras.config.backend() != "torch":
            return ops.convert_to_tensor(_id_table_array(ids, vocab))
        tables = self.__dict__.setdefault("_tables", {})
        if key not in tables:
            tables[key] = ops.convert_to_tensor(_id_table_array(ids, vocab))
        return tables[key]

    @property
    def variables(self):
        return self.sampler.variables

    def _resolved_unweighted_ids(self):
        if self.unweighted_ids is None:
            return []
        if self.unweighted_ids == "world":
            return _world_unweighted_ids()
        return [int(t) for t in self.unweighted_ids]

    def apply_penalties(self, logits, tokens, read_mask, generated_mask):
        """Penalised logits for one step.

        Args:
            logits: `[B, V]`.
            tokens: `[B, L]` the token buffer.
            read_mask: `[B, L]` bool, real tokens read so far (prompt and
                generated).
            generated_mask: `[B, L]` bool, the generated tokens so far.

        Returns:
            `[B, V]` float32 logits.
        """
        # No Python number goes into a Keras op here: on torch each would
        # be a copy to the device, and a wait for it, every step. Tensor
        # arithmetic and comparisons take numbers as they are.
        logits = ops.cast(logits, "float32")
        vocab = logits.shape[-1]
        tokens = ops.cast(tokens, "int32")

        if self.repetition_penalty != 1.0:
            counted = read_mask
            if self.penalty_window is not None:
                # Rank of each real token from the newest one backwards.
                from_end = ops.flip(
                    ops.cumsum(ops.flip(ops.cast(read_mask, "int32"), 1), 1),
                    1,
                )
                counted = ops.logical_and(
                    counted, from_end <= self.penalty_window
                )
            counts = _token_counts(tokens, ops.cast(counted, "float32"), vocab)
            if self.max_penalty_range is not None:
                lo, hi = self.max_penalty_range
                counts = ops.where(
                    counts < lo,
                    ops.zeros_like(counts),
                    ops.minimum(counts, _filled(counts, hi)),
                )
            scale = ops.power(_filled(counts, self.repetition_penalty), counts)
            logits = ops.where(logits > 0, logits / scale, logits * scale)

        if self.presence_penalty or self.frequency_penalty:
            # Age of each generated token: 0 for the newest.
            gen = ops.cast(generated_mask, "int32")
            age = ops.flip(ops.cumsum(ops.flip(gen, 1), 1), 1) - 1
            age = ops.cast(age, "float32")
            weights = ops.power(_filled(age, self.penalty_decay), age)
            weights = weights * ops.cast(generated_mask, "float32")
            unweighted = self._resolved_unweighted_ids()
            if unweighted:
                is_free = ops.take(self._id_table(unweighted, vocab), tokens)
                freq_weights = ops.where(
                    is_free, ops.zeros_like(weights), weights
                )
            else:
                freq_weights = weights
            occurrence = _token_counts(tokens, freq_weights, vocab)
            present = _token_counts(
                tokens, ops.cast(generated_mask, "float32"), vocab
            )
            penalty = self.presence_penalty + self.frequency_penalty * (
                occurrence
            )
            logits = logits - ops.where(
                present > 0, penalty, ops.zeros_like(penalty)
            )

        if self.token_ban:
            ban = self._id_table(self.token_ban, vocab)
            logits = ops.where(
                ban[None, :], _filled(logits, -float("inf")), logits
            )
        return logits / self.penalty_temperature

    def penalize(self, logits, tokens, index, start, prompt_mask):
        """`apply_penalties` at step `index` of a token buffer.

        Args:
            logits: `[B, V]`.
            tokens: `[B, L]` the token buffer; negative ids are padding.
            index: the column being generated; earlier ones are read.
            start: the first generated column.
            prompt_mask: `[B, L]` (or `[1, L]`) bool, the prompt region.

        Returns:
            `[B, V]` float32 logits.
        """
        columns = ops.arange(ops.shape(tokens)[1], dtype="int32")[None]
        real = tokens >= 0
        generated = ops.logical_and(columns >= start, columns < index)
        generated = ops.logical_and(generated, real)
        read = ops.logical_and(prompt_mask, columns < index)
        read = ops.logical_or(ops.logical_and(read, real), generated)
        return self.apply_penalties(
            logits,
            ops.where(real, tokens, ops.zeros_like(tokens)),
            read,
            generated,
        )

    def __call__(
        self,
        next,
        prompt,
        cache=None,
        index=0,
        mask=None,
        stop_token_ids=None,
        hidden_states=None,
        model=None,
        **kwargs,
    ):
        start = ops.cast(index, "int32")
        prompt_mask = (
            ops.zeros_like(prompt, "bool")
            if mask is None
            else ops.cast(mask, "bool")
        )

        def penalised_next(tokens, cache, index):
            logits, hidden, cache = next(tokens, cache, index)
            # Beam search repeats rows; follow its layout.
            repeats = ops.shape(tokens)[0] // ops.shape(prompt_mask)[0]
            read = ops.repeat(prompt_mask, repeats, axis=0)
            logits = self.penalize(logits, tokens, index, start, read)
            return logits, hidden, cache

        return self.sampler(
            next=penalised_next,
            prompt=prompt,
            cache=cache,
            index=index,
            mask=mask,
            stop_token_ids=stop_token_ids,
            hidden_states=hidden_states,
            model=model,
            **kwargs,
        )

    def get_config(self):
        return {
            "sampler": serialize_sampler(self.sampler),
            "repetition_penalty": self.repetition_penalty,
            "penalty_window": self.penalty_window,
            "max_penalty_range": self.max_penalty_range,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "penalty_decay": self.penalty_decay,
            "token_ban": self.token_ban,
            "unweighted_ids": self.unweighted_ids,
            "temperature": self.penalty_temperature,
        }


@functools.cache
def _world_unweighted_ids():
    # Once a process: it reads the whole World vocabulary.
    from keras_rwkv.models.rwkv6.rwkv6_tokenizer import RWKV6Tokenizer

    return pipeline_unweighted_ids(RWKV6Tokenizer())


def _filled(x, value):
    """`x`'s shape and dtype, filled with the number `value` on the device
    (Keras's torch `full_like` and `clip` copy the number over)."""
    return ops.zeros_like(x) + value


def _token_counts(tokens, weights, vocab):
    """Per row, the sum of `weights` of each token id (all in
    `[0, vocab)`): `[B, V]`."""
    if keras.config.backend() == "torch":
        # Keras's torch `segment_sum` copies a shape to the device and
        # reads a count back, two waits for the device a call.
        import torch

        counts = torch.zeros(
            (tokens.shape[0], vocab), dtype=weights.dtype, device=weights.device
        )
        return counts.scatter_add_(1, tokens.long(), weights)
    batch = ops.shape(tokens)[0]
    rows = ops.arange(batch, dtype="int32")[:, None] * vocab
    segments = ops.reshape(rows + tokens, (-1,))
    counts = ops.segment_sum(
        ops.reshape(weights, (-1,)), segments, num_segments=batch * vocab
    )
    return ops.reshape(counts, (batch, vocab))


def _id_table_array(ids, vocab):
    """A constant `[V]` bool table, True at `ids`."""
    table = np.zeros((vocab,), bool)
    table[[i for i in ids if 0 <= i < vocab]] = True
    return table
