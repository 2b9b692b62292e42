import functools
import math

import keras
import numpy as np
from keras import ops
from keras_hub.models import CausalLM
from keras_hub.samplers import ContrastiveSampler
from keras_hub.samplers import Sampler
from keras_hub.samplers import SpeculativeSampler

from keras_rwkv.models.rwkv6.rwkv6_backbone import RWKV6Backbone
from keras_rwkv.models.rwkv6.rwkv6_causal_lm_preprocessor import (
    RWKV6CausalLMPreprocessor,
)
from keras_rwkv.models.rwkv6.rwkv6_compiled import compile_for_backend
from keras_rwkv.models.rwkv6.rwkv6_decoding import decode_steps
from keras_rwkv.models.rwkv6.rwkv6_decoding import has_own_loop
from keras_rwkv.models.rwkv6.rwkv6_decoding import kept_mask
from keras_rwkv.models.rwkv6.rwkv6_decoding import left_pad
from keras_rwkv.models.rwkv6.rwkv6_decoding import sampler_loop
from keras_rwkv.models.rwkv6.rwkv6_generate_inputs import new_token_counts
from keras_rwkv.models.rwkv6.rwkv6_generate_inputs import prompt_rows
from keras_rwkv.models.rwkv6.rwkv6_generate_inputs import stop_ids
from keras_rwkv.models.rwkv6.rwkv6_quantize import quantize_with_filter
from keras_rwkv.models.rwkv6.rwkv6_state import RWKV6State
from keras_rwkv.models.rwkv6.rwkv6_torch_forward import flat_for_torch_loss
from keras_rwkv.models.rwkv6.rwkv6_torch_forward import keras_compile_off
from keras_rwkv.models.rwkv6.rwkv6_torch_forward import torch_forward
from keras_rwkv.models.rwkv6.rwkv6_torch_step import read_function

# Streaming: the longest segment decoded between two deliveries.
STREAM_SEGMENT = 16


def bucket_length(n):
    """Length a prompt (or generation budget) of `n` tokens is padded to, so
    that nearby lengths share one compiled program: powers of two from 16
    up to 512, then multiples of 256."""
    if n <= 16:
        return 16
    if n <= 512:
        return 2 ** math.ceil(math.log2(n))
    return 256 * math.ceil(n / 256)


@keras.saving.register_keras_serializable(package="keras_rwkv")
class RWKV6CausalLM(CausalLM):
    """An RWKV6 model for causal language modeling and generation.

    `fit` trains on next-token prediction (with a preprocessor, on raw
    strings). `generate` reads the prompt with the chunked sequence path,
    then decodes one token per step with the step path, all in one
    compiled program per shape on JAX; the recurrent state can be passed in
    and returned, so a long prompt is read once and reused.

    Generation uses the sampler set with `compile(sampler=...)`: greedy,
    top_k, top_p, random or beam from KerasHub, optionally wrapped in
    `keras_rwkv.samplers.PenaltySampler` for repetition / presence /
    frequency penalties. The contrastive and speculative samplers do not
    apply (see the generation docs).

    Args:
        backbone: an `RWKV6Backbone`.
        preprocessor: an `RWKV6CausalLMPreprocessor` or `None` (then
            `generate` takes and returns token ids).

    Examples:
    ```python
    lm = keras_hub.models.CausalLM.from_preset("rwkv6_world_1.6b")
    lm.generate("The capital of France is", max_new_tokens=16)

    # Read a long context once, reuse it.
    state = lm.prefill("A long document ...")
    answer, state = lm.generate(
        "\\nQuestion: ...", state=state, return_state=True
    )
    state.save("context.npz")
    ```
    """

    backbone_cls = RWKV6Backbone
    preprocessor_cls = RWKV6CausalLMPreprocessor

    def __init__(self, backbone, preprocessor=None, **kwargs):
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor

        # === Functional Model ===
        inputs = backbone.input
        hidden_states = backbone(inputs)
        outputs = backbone.token_embedding(hidden_states, reverse=True)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self._compiled_functions = {}

    def compile(self, *args, **kwargs):
        super().compile(*args, **kwargs)
        if not isinstance(self.sampler, Sampler):
            raise ValueError(
                f"Unknown sampler {self.sampler!r}. Use a keras_hub.samplers "
                "name (greedy, top_k, top_p, random, beam) or a Sampler, "
                "e.g. keras_rwkv.samplers.PenaltySampler('top_p', ...)."
            )
        self._compiled_functions = {}
        self._trainable_at_compile = self._trainable_paths()

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """Keras's `quantize` (`"int8"`, `"int4"`, `"float8"`, ...) over
        the projections, the embedding and the head; the tokenizer, the WKV
        math, the decay and the norms are left as they are. Save with
        `save_to_preset`; `from_preset` loads it quantized."""
        quantize_with_filter(super().quantize, mode, config, filters, kwargs)

    def _post_quantize(self, mode, **kwargs):
        super()._post_quantize(mode, **kwargs)
        self._compiled_functions = {}

    def _trainable_paths(self):
        return sorted(v.path for v in self.trainable_variables)

    def fit(self, *args, **kwargs):
        compiled_for = getattr(self, "_trainable_at_compile", None)
        optimizer = getattr(self, "optimizer", None)
        if (
            getattr(optimizer, "built", False)
            and compiled_for is not None
            and compiled_for != self._trainable_paths()
        ):
            # The optimizer was built for other variables: training now
            # would fail half-way and leave the model broken.
            raise ValueError(
                "The trainable variables changed since compile() "
                "(enable_state_tuning or enable_lora): call compile() again "
                "before fit()."
            )
        return super().fit(*args, **kwargs)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        y, y_pred, sample_weight = flat_for_torch_loss(y, y_pred, sample_weight)
        return super().compute_loss(
            x=x,
            y=y,
            y_pred=y_pred,
            sample_weight=sample_weight,
            training=training,
        )

    def call(self, inputs, training=None, mask=None, **kwargs):
        # torch with jit_compile=True: one program per shape
        # (rwkv6_torch_forward.py); elsewhere the functional graph.
        logits = None if kwargs else torch_forward(self, inputs)
        if logits is not None:
            return logits
        return super().call(inputs, training=training, mask=mask, **kwargs)

    def make_train_function(self, force=False):
        with keras_compile_off(self):
            return super().make_train_function(force)

    def make_test_function(self, force=False):
        with keras_compile_off(self):
            return super().make_test_function(force)

    def make_predict_function(self, force=False):
        with keras_compile_off(self):
            return super().make_predict_function(force)

    # --- model pieces -----------------------------------------------------

    def enable_state_tuning(self, time_shift=True):
        """See `RWKV6Backbone.enable_state_tuning`. Compile afterwards."""
        self.backbone.enable_state_tuning(time_shift=time_shift)
        self._compiled_functions = {}

    def call_with_state(
        self, token_ids, padding_mask=None, state=None, contiguous=None
    ):
        """Logits, hidden states and the new state (see
        `RWKV6Backbone.call_with_state`)."""
        hidden, state = self.backbone.call_with_state(
            token_ids, padding_mask, state, contiguous
        )
        logits = self.backbone.token_embedding(hidden, reverse=True)
        return logits, hidden, state

    # --- host-side helpers ------------------------------------------------

    def _tokenizer(self):
        return (
            None if self.preprocessor is None else self.preprocessor.tokenizer
        )

    def _prompt_rows(self, inputs):
        """Prompts as lists of ids, and whether the input was a single
        prompt (checked: `rwkv6_generate_inputs.py`)."""
        return prompt_rows(
            inputs, self._tokenizer(), self.backbone.vocabulary_size
        )

    def _stop_ids(self, stop_token_ids):
        return stop_ids(
            stop_token_ids, self._tokenizer(), self.backbone.vocabulary_size
        )

    def _compiled(self, key, fn, frozen_weights=False):
        """`fn` compiled for this backend (`rwkv6_compiled.py`), once per
        key; `compile` and `quantize` drop them."""
        if key not in self._compiled_functions:
            self._compiled_functions[key] = compile_for_backend(
                self, fn, frozen_weights
            )
        return self._compiled_functions[key]

    def _prepare_state(self, state, batch_size):
        if state is None:
            return None
        if not isinstance(state, RWKV6State):
            raise TypeError(
                "state must be an RWKV6State (from prefill, generate with "
                f"return_state=True, or RWKV6State.load); got "
                f"{type(state).__name__}."
            )
        state.check_compatible(self.backbone)
        state = state.broadcast_to(batch_size)
        return RWKV6State(
            wkv=ops.convert_to_tensor(state.wkv, "float32"),
            shift=ops.cast(state.shift, self.backbone.compute_dtype),
        )

    # --- prefill ----------------------------------------------------------

    def prefill(self, inputs, state=None):
        """Reads prompts and returns the recurrent state after them.

        Args:
            inputs: a string, a list of strings, or `{"token_ids",
                "padding_mask"}`.
            state: optional `RWKV6State` to start from (batch 1 or B).

        Returns:
            An `RWKV6State` of batch B (1 for a single string).
        """
        rows, _ = self._prompt_rows(inputs)
        if not rows:
            raise ValueError("prefill() got an empty batch.")
        length = bucket_length(max(1, max(len(r) for r in rows)))
        ids = left_pad(rows, length, fill=-1)
        return self._read(ids, self._prepare_state(state, len(rows)))

    def _read(self, ids, state):
        """The state after reading the `[B, T]` ids (-1 for pads), one
        compiled program per shape."""

        def fn(ids, state):
            # Left-padded: each row's real tokens are one run.
            _, _, new_state = self.call_with_state(
                ops.maximum(ids, 0),
                ops.cast(ids >= 0, "int32"),
                state,
                contiguous=True,
            )
            return new_state

        key = ("read", ids.shape, state is None)
        return self._compiled(key, read_function(self, fn))(ids, state)

    # --- generate ---------------------------------------------------------

    def _check_sampler(self, stream):
        if self.sampler is None:
            self.compile(sampler="greedy")
        inner = getattr(self.sampler, "sampler", self.sampler)
        if isinstance(inner, (ContrastiveSampler, SpeculativeSampler)):
            raise ValueError(
                f"{type(inner).__name__} does not apply to RWKV: it needs "
                "per-position hidden states (or a draft model) over the whole "
                "context, which a recurrent model does not keep. Use greedy, "
                "top_k, top_p, random or beam."
            )
        if stream is not None and has_own_loop(self.sampler):
            raise ValueError(
                f"Streaming is not available with {type(inner).__name__}: "
                "it runs a loop of its own (beams are only ranked at the "
                "end)."
            )

    def generate(
        self,
        inputs,
        max_length=None,
        stop_token_ids="auto",
        strip_prompt=False,
        state=None,
        return_state=False,
        max_new_tokens=None,
        stream=None,
    ):
        """Generates text (or token ids) after the given prompts.

        The prompts are left-padded together, read with the chunked
        sequence path (pads never touch the state), then tokens are decoded
        one step at a time with the compiled sampler loop. Rows of any
        length give exactly what each row gives alone.

        Args:
            inputs: a string, a list of strings, or preprocessed token ids
                `{"token_ids": [B, T], "padding_mask": [B, T]}` (then token
                ids come back, with or without a preprocessor).
            max_length: int. KerasHub's meaning: each row's total length,
                its prompt included, so a row of `n` prompt tokens gets up
                to `max_length - n` new tokens, in a batch as alone (a
                `state` passed in does not count). Defaults to the
                preprocessor's `sequence_length`. Must exceed the longest
                prompt.
            stop_token_ids: `"auto"` (the end token, id 0), `None` (always
                run to the length limit) or a list of ids. Each row stops at
                its own first stop token (kept in the output ids; id 0 is
                dropped from text).
            strip_prompt: return only the generated part.
            state: an `RWKV6State` (batch 1 or B) the prompts continue
                from, e.g. from `prefill`.
            return_state: also return the state after the output (prompt
                and generated tokens, up to and including a stop token).
            max_new_tokens: int. The number of new tokens for every row,
                instead of `max_length`.
            stream: a callable receiving each newly generated step as an
                int array `[B]`, as soon as it is produced (not with beam
                search). A row that has ended (its stop token, or its own
                `max_length`) may still receive tokens: ignore them.

        Returns:
            Text (a string for a single string prompt, else a list), or a
            dict of token ids and mask for token-id inputs; with
            `return_state=True`, `(outputs, state)`.

        An empty prompt without `state` starts from the end-of-text token
        (id 0), as every World training document does. With a `state`, a
        prompt must have at least one token.
        """
        self._check_sampler(stream)
        rows, scalar = self._prompt_rows(inputs)
        text_out = not isinstance(inputs, dict)
        if not rows:
            raise ValueError("generate() got an empty batch.")
        if any(len(r) == 0 for r in rows):
            if state is not None:
                raise ValueError(
                    "An empty prompt cannot continue a state: the model "
                    "needs at least one new token to predict from."
                )
            rows = [r if r else [0] for r in rows]
        lengths = [len(r) for r in rows]
        row_limits = new_token_counts(
            lengths, max_length, max_new_tokens, self.preprocessor
        )
        stop_ids = self._stop_ids(stop_token_ids)

        # Bucketed shapes, so that nearby lengths share compiled programs.
        prompt_len = bucket_length(max(lengths))
        width = prompt_len + bucket_length(max(row_limits)) + 1
        tokens = left_pad(rows, prompt_len, width, fill=-1)
        row_end = prompt_len + np.asarray(row_limits, "int32")
        state = self._read(
            tokens[:, : prompt_len - 1], self._prepare_state(state, len(rows))
        )
        if has_own_loop(self.sampler):
            tokens, state = self._sampler_loop(
                tokens, state, row_end, prompt_len, stop_ids, return_state
            )
        else:
            tokens, state = self._decode(
                tokens, state, row_end, prompt_len, stop_ids, stream
            )
        kept = kept_mask(tokens, prompt_len, stop_ids)
        if strip_prompt:
            kept[:, :prompt_len] = False
        outputs = {"token_ids": np.maximum(tokens, 0), "padding_mask": kept}
        if text_out:
            outputs = self.preprocessor.generate_postprocess(outputs)
            if scalar:
                outputs = outputs[0]
        else:
            outputs = _compact(outputs)
            if scalar:
                outputs = {k: v[0] for k, v in outputs.items()}
        if return_state:
            return outputs, state
        return outputs

    def _decode(self, tokens, state, row_end, prompt_len, stop_ids, stream):
        """Runs `decode_steps` until every row ended: in one call, or in
        growing segments (1, 2, 4, ... 16 tokens) when streaming, each
        delivered as soon as it is back on the host."""

        fn = functools.partial(
            decode_steps, self, prompt_len=prompt_len, stop_ids=stop_ids
        )
        decode = self._compiled(("decode", tokens.shape, stop_ids), fn)
        index, width = prompt_len, tokens.shape[1]
        finished = np.zeros((tokens.shape[0],), bool)
        segment = 1
        while True:
            end = width if stream is None else min(index + segment, width)
            tokens, state, new_index, finished = decode(
                tokens, state, np.int32(index), finished, np.int32(end), row_end
            )
            new_index = int(ops.convert_to_numpy(new_index))
            done = bool(np.all(ops.convert_to_numpy(finished)))
            if stream is not None:
                host = np.asarray(ops.convert_to_numpy(tokens))
                for column in range(index, new_index):
                    if (host[:, column] >= 0).any():
                        stream(host[:, column])
            index, segment = new_index, min(2 * segment, STREAM_SEGMENT)
            if done:
                return np.asarray(ops.convert_to_numpy(tokens)), state

    def _sampler_loop(
        self, tokens, state, row_end, prompt_len, stop_ids, return_state
    ):
        """Generation with the sampler's own loop (beam search); the state
        is then read again over the chosen output."""

        def fn(tokens, state, row_end):
            return sampler_loop(
                self, tokens, state, row_end, prompt_len, stop_ids
            )

        key = ("sampler_loop", tokens.shape, stop_ids)
        out = self._compiled(key, fn)(tokens, state, row_end)
        out = np.asarray(ops.convert_to_numpy(out))
        out = np.where(kept_mask(out, prompt_len, stop_ids), out, -1)
        if return_state:
            state = self._read(out[:, prompt_len - 1 :], state)
        return out, state


def _compact(outputs):
    """Token-id outputs without the internal gap: each row's kept tokens,
    left-padded to the longest row."""
    ids = np.asarray(ops.convert_to_numpy(outputs["token_ids"]))
    mask = np.asarray(ops.convert_to_numpy(outputs["padding_mask"]))
    rows = [r[m] for r, m in zip(ids, mask.astype(bool))]
    padded = left_pad(rows, max(1, max(len(r) for r in rows)), fill=-1)
    return {"token_ids": np.maximum(padded, 0), "padding_mask": padded >= 0}
