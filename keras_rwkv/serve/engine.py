"""Continuous batching for `keras-rwkv serve`.

One thread owns the model. It holds `max_batch` slots: one recurrent state
per slot, stacked into one batch, and one compiled step program that feeds
every slot a token and returns the next logits. A request waits in a
bounded queue, joins a free slot between two steps (its prompt read first,
from the longest cached prefix on), is sampled row by row with its own
sampler, and frees the slot when it ends (stop token, stop string, its
token budget, a timeout, or its client gone). An idle slot is fed a pad,
which leaves its state as it is: one program serves every batch mix.

The step program is built, and run once over idle slots, before the first
request is taken, so no client waits for a compile. On torch with
`jit_compile=True` it is `generate`'s compiled decoding step (on a GPU a
CUDA graph; `rwkv6_torch_step.py`); eager torch runs each step as
thousands of Keras ops, ~30x slower on a GPU.
"""

import functools
import logging
import queue
import threading
import time

import keras
import numpy as np
from keras import ops

from keras_rwkv.models.rwkv6.rwkv6_decoding import _picker
from keras_rwkv.models.rwkv6.rwkv6_state import RWKV6State
from keras_rwkv.models.rwkv6.rwkv6_torch_step import compiling
from keras_rwkv.models.rwkv6.rwkv6_torch_step import step_function
from keras_rwkv.serve.chat import StopText
from keras_rwkv.serve.row_picker import RowPicker
from keras_rwkv.serve.state_cache import StateCache

log = logging.getLogger("keras_rwkv")


class QueueFull(Exception):
    """The waiting queue is full: answer 429."""


class EngineStopped(Exception):
    """The engine is not running: answer 503."""


class Job:
    """One request's generation.

    Args:
        prompt_ids: the prompt's token ids (at least one).
        sampler: its own `PenaltySampler` (`protocol.make_sampler`).
        max_tokens: the most tokens to generate (a stop token counts).
        emit: `emit(kind, data)`, called from the engine thread:
            `("text", str)` for each new piece of text, then `("done",
            finish_reason)` ("stop", "length", "timeout", "cancelled") or
            `("error", message)`.
        stop_ids: token ids that end the text (not part of it).
        stop_texts: strings that end the text (not part of it).
        boundaries: prompt lengths after which the state is worth caching
            (chat message ends).
        deadline: `time.monotonic()` value after which it ends with
            "timeout".
        follow_up: `follow_up(text)` -> `(prefix_ids, more_ids)` or None:
            after the end, the state after `prefix_ids + more_ids` is
            cached (the canonical form of a chat reply, read once).
    """

    def __init__(
        self,
        prompt_ids,
        sampler,
        max_tokens,
        emit,
        stop_ids=(0,),
        stop_texts=(),
        boundaries=(),
        deadline=None,
        follow_up=None,
    ):
        if not prompt_ids:
            raise ValueError("A prompt needs at least one token.")
        self.prompt_ids = [int(i) for i in prompt_ids]
        self.penalties, self.picker = _picker(sampler)
        self.max_tokens = int(max_tokens)
        self.emit = emit
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.stop_text = StopText(stop_texts)
        self.boundaries = sorted(set(boundaries))
        self.deadline = deadline
        self.follow_up = follow_up
        self.generated = []
        self.cached_tokens = 0
        self.finish_reason = None
        self.cancelled = False
        self.decoder = None
        self.sampler_key = None  # RowPicker's grouping
        self.seed_state = None  # and the sampler's seeds between picks

    def cancel(self):
        """Ends the job at the next step (its client went away)."""
        self.cancelled = True

    @property
    def text(self):
        return self.stop_text.text


class Engine:
    """The batching loop around an `RWKV6CausalLM` (see the module
    docstring).

    Args:
        lm: the `RWKV6CausalLM` (with its preprocessor's tokenizer).
        max_batch: slots decoded together.
        max_queue: requests that may wait for a slot; more get `QueueFull`.
        cache_bytes: memory for the state cache (0 turns it off).
    """

    def __init__(self, lm, max_batch=8, max_queue=64, cache_bytes=1 << 30):
        self.lm = lm
        self.tokenizer = lm.preprocessor.tokenizer
        self.max_batch = int(max_batch)
        self.cache = StateCache(cache_bytes)
        self._queue = queue.Queue(maxsize=max(0, int(max_queue)) or 1)
        self._slots = [None] * self.max_batch
        self._fed = np.full((self.max_batch, 1), -1, "int32")
        self._layers = None
        self._picker = RowPicker()
        self._insert = _jit(_insert)
        self._thread = None
        self._stopping = threading.Event()
        self._failed = None
        self.counters = {
            "requests": 0,
            "tokens_generated": 0,
            "prompt_tokens_read": 0,
            "steps": 0,
            "cancelled": 0,
            "timeouts": 0,
        }
        # Seconds the engine thread spent: starting requests (prompt
        # reads), running steps, picking tokens (waiting for the step's
        # result), turning tokens into text and events (and caching a
        # finished reply's state).
        self.seconds = dict.fromkeys(("admit", "step", "pick", "emit"), 0.0)

    # --- control ------------------------------------------------------

    def start(self):
        if self.lm.sampler is None:
            self.lm.compile(sampler="greedy")
        state = self.lm.backbone.initial_state(self.max_batch)
        self._layers = state.layers()
        if compiling(self.lm):
            self._step_program = _torch_step(self.lm)
        else:  # the served weights do not change: read them once
            self._step_program = self.lm._compiled(
                ("serve", "step", self.max_batch),
                functools.partial(_step, self.lm),
                frozen_weights=True,
            )
        start = time.perf_counter()
        _, self._layers = self._step_program(self._fed, self._layers)
        log.info(
            "the decoding step is ready (%.1f s)", time.perf_counter() - start
        )
        self._thread = threading.Thread(
            target=self._run, name="keras-rwkv-engine", daemon=True
        )
        self._thread.start()

    def stop(self):
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def running(self):
        return (
            self._thread is not None
            and self._thread.is_alive()
            and not self._stopping.is_set()
        )

    def submit(self, job):
        """Queues `job`; raises `QueueFull` or `EngineStopped`."""
        if not self.running:
            raise EngineStopped(self._failed or "the engine is not running")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(
                f"{self._queue.maxsize} requests are already waiting"
            ) from None
        self.counters["requests"] += 1

    def stats(self):
        return {
            "running": self.running,
            "active": sum(job is not None for job in self._slots),
            "waiting": self._queue.qsize(),
            "max_batch": self.max_batch,
            "max_queue": self._queue.maxsize,
            **self.counters,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "state_cache": self.cache.stats(),
        }

    # --- the loop -----------------------------------------------------

    def _run(self):
        try:
            while not self._stopping.is_set():
                self._timed("admit", self._admit)
                if any(job is not None for job in self._slots):
                    self._step()
        except Exception as e:  # noqa: BLE001 - reported to every client
            self._failed = f"the engine failed: {type(e).__name__}: {e}"
            for job in self._slots:
                if job is not None:
                    job.emit("error", self._failed)
            raise

    def _admit(self):
        idle = not any(job is not None for job in self._slots)
        for slot in range(self.max_batch):
            if self._slots[slot] is not None:
                continue
            try:
                # Nothing to decode: wait for work (briefly, to see stop).
                job = self._queue.get(timeout=0.05 if idle else 0)
            except queue.Empty:
                return
            idle = False
            if self._ended_early(job):
                continue
            try:
                state = self._read_prompt(job)
            except Exception as e:  # noqa: BLE001 - this request only
                job.emit("error", f"{type(e).__name__}: {e}")
                continue
            self._layers = self._insert(
                self._layers, state.wkv, state.shift, np.int32(slot)
            )
            self._fed[slot, 0] = job.prompt_ids[-1]
            job.decoder = self.tokenizer.stream_decoder()
            self._slots[slot] = job

    def _read_prompt(self, job):
        """The state after all prompt ids but the last (fed by the first
        step), from the longest cached prefix on; caches message ends."""
        ids = job.prompt_ids
        start, state = self.cache.longest_prefix(ids)
        job.cached_tokens = start
        cuts = [b for b in job.boundaries if start < b < len(ids)]
        for cut in [*cuts, len(ids) - 1]:
            if cut > start:
                state = self._read(ids[start:cut], state)
                self.counters["prompt_tokens_read"] += cut - start
                start = cut
                if cut in job.boundaries:
                    self.cache.put(ids[:cut], state)
        if state is None:
            state = self.lm.backbone.initial_state(1)
        return state

    def _read(self, ids, state):
        ids = np.asarray([ids], "int32")
        return self.lm.prefill(
            {"token_ids": ids, "padding_mask": np.ones_like(ids)}, state=state
        )

    def _timed(self, name, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        self.seconds[name] += time.perf_counter() - start
        return out

    def _step(self):
        logits, self._layers = self._timed(
            "step", self._step_program, self._fed, self._layers
        )
        self.counters["steps"] += 1
        tokens = self._timed("pick", self._pick, logits)
        self._timed("emit", self._take, tokens)

    def _take(self, tokens):
        for slot, token in tokens.items():
            job = self._slots[slot]
            self.counters["tokens_generated"] += 1
            if len(job.generated) == 0:
                self.counters["prompt_tokens_read"] += 1
            job.generated.append(token)
            self._advance(job, token)
            if job.finish_reason is not None:
                self._finish(slot, job)
            else:
                self._fed[slot, 0] = token

    def _pick(self, logits):
        """The next token of every active slot, each row by its own
        sampler (as `generate` would for that request alone)."""
        active = []
        for slot, job in enumerate(self._slots):
            if job is None or job.finish_reason is not None:
                continue
            if self._ended_early(job):
                self._finish(slot, job)
                continue
            active.append((slot, job))
        return self._picker.pick(active, logits)

    def _advance(self, job, token):
        """Turns a new token into text (held back where it may start a stop
        string) and decides whether the job ends."""
        if token in job.stop_ids:
            job.finish_reason = "stop"
            self._emit_text(job, job.decoder.flush(), final=True)
        elif self._emit_text(job, job.decoder.add(token)):
            job.finish_reason = "stop"
        elif len(job.generated) >= job.max_tokens:
            job.finish_reason = "length"
            self._emit_text(job, job.decoder.flush(), final=True)

    def _emit_text(self, job, piece, final=False):
        delta, stopped = job.stop_text.add(piece)
        if final and not stopped:
            delta += job.stop_text.flush()
        if delta:
            job.emit("text", delta)
        return stopped

    def _ended_early(self, job):
        """Ends a cancelled or timed-out job; True if it ended."""
        if job.cancelled:
            job.finish_reason = "cancelled"
            self.counters["cancelled"] += 1
        elif job.deadline is not None and time.monotonic() > job.deadline:
            job.finish_reason = "timeout"
            self.counters["timeouts"] += 1
        else:
            return False
        if job.decoder is None:  # never admitted
            job.emit("done", job.finish_reason)
        return True

    def _finish(self, slot, job):
        self._slots[slot] = None
        self._fed[slot, 0] = -1
        job.emit("done", job.finish_reason)
        if job.follow_up is not None and job.finish_reason in (
            "stop",
            "length",
        ):
            try:
                self._cache_follow_up(job)
            except Exception:  # noqa: BLE001 - the cache is an extra
                log.warning("caching a reply's state failed", exc_info=True)

    def _cache_follow_up(self, job):
        found = job.follow_up(job.text)
        if found is None:
            return
        prefix, more = found
        state = self.cache.get(prefix)
        if state is not None and self.cache.get(prefix + more) is None:
            self.cache.put(prefix + more, self._read(more, state))


def _step(lm, fed, layers):
    logits, _, layers = lm.call_with_state(
        ops.maximum(fed, 0), ops.cast(fed >= 0, "int32"), layers
    )
    return logits[:, 0], layers


def _torch_step(lm):
    """`_step` through `generate`'s compiled torch step. The state it
    returns is the program's own buffers: the engine hands them back at
    the next step (a slot's new state, made by `_insert`, is copied in)."""
    import torch

    step = step_function(lm)

    def run(fed, layers):
        # The pads and the mask made on the host: a number given to a
        # torch op on a GPU is a copy to it and a wait.
        ids = ops.convert_to_tensor(np.maximum(fed, 0), "int32")
        mask = ops.convert_to_tensor((fed >= 0).astype("int32"))
        with torch.no_grad():
            logits, _, layers = step(ids, mask, layers)
        return logits[:, 0], layers

    return run


def _jit(fn):
    if keras.config.backend() != "jax":
        return fn
    import jax

    return jax.jit(fn)


def _insert(layers, wkv, shift, slot):
    # Split inside the program: 3 x L slices run eagerly cost more than
    # reading a short prompt.
    row_layers = RWKV6State(wkv=wkv, shift=shift).layers()
    return [
        tuple(
            ops.slice_update(x, [slot] + [0] * (len(x.shape) - 1), r)
            for x, r in zip(layer, row)
        )
        for layer, row in zip(layers, row_layers)
    ]
