"""The next token of every active slot, each row by its own request's
sampler, as `lm.generate` would pick it for that request alone.

Eager per-row sampling costs a few milliseconds a row on JAX (each op a
dispatch over `[1, V]`), which at 32 rows outweighs the model's step. So on
JAX the rows whose samplers differ only in their seed share one compiled
program: penalties, probabilities and the draw, vmapped over the rows, each
row with its own seed state (the sampler's variables, passed in and
returned as `lm.generate`'s compiled loop does). Programs are cached by
sampler configuration, token-buffer width (a power of two) and row count
(a power of two); other backends sample row by row eagerly.
"""

import json

import keras
import numpy as np
from keras import ops

MIN_WIDTH = 64


class RowPicker:
    """Picks the next token of each active slot (see the module
    docstring); the engine holds one."""

    def __init__(self):
        self._programs = {}
        self.compiled = keras.config.backend() == "jax"

    def pick(self, jobs, logits):
        """`{slot: token}` for `jobs`, a list of `(slot, job)`; `logits`
        `[max_batch, V]`."""
        if not jobs:
            return {}
        if not self.compiled:
            return {
                slot: self._eager(job, logits[slot : slot + 1])
                for slot, job in jobs
            }
        groups = {}
        for slot, job in jobs:
            groups.setdefault(_config_key(job), []).append((slot, job))
        picks = {}
        for key, members in groups.items():
            picks.update(self._grouped(key, members, logits))
        return picks

    def _eager(self, job, row):
        if job.penalties is not None:
            row = job.penalties.penalize(row, *_buffers(job, _width(job)))
        probabilities = job.picker.compute_probabilities(row)
        token = job.picker.get_next_token(probabilities)
        return int(ops.convert_to_numpy(token).reshape(-1)[0])

    def _grouped(self, key, members, logits):
        width = _bucket(max(_width(job) for _, job in members))
        rows = _bucket(len(members), 1)
        # Pad the group to a power of two with copies of its first row
        # (their picks and seed updates are dropped).
        padded = members + [members[0]] * (rows - len(members))
        program = self._programs.get((key, width, rows))
        if program is None:
            program = _program(members[0][1])
            self._programs[(key, width, rows)] = program
        slots = np.asarray([slot for slot, _ in padded], "int32")
        buffers = [_buffers(job, width) for _, job in padded]
        # One array per seed variable, a row per job.
        seeds = [
            np.stack(column)
            for column in zip(*(_seed_state(job) for _, job in padded))
        ]
        tokens, new_seeds = program(
            logits,
            slots,
            *(np.stack(column) for column in zip(*buffers)),
            seeds,
        )
        # One transfer for the group (the tokens and seeds are needed on
        # the host anyway: the next step's input, the next pick's seeds).
        tokens, new_seeds = _to_host((tokens, new_seeds))
        for i, (_, job) in enumerate(members):
            job.seed_state = [s[i] for s in new_seeds]
        return {slot: int(tokens[i]) for i, (slot, _) in enumerate(members)}


def _program(template):
    """The compiled pick for jobs configured like `template`: `(logits
    [max_batch, V], slots [G], buffers..., seeds) -> (tokens [G], new
    seeds)`."""
    import jax

    penalties, picker = template.penalties, template.picker
    template_vars = _variables(template)

    def one(row, buffer, index, prompt, prompt_mask, seeds):
        mapping = zip(template_vars, seeds)
        with keras.StatelessScope(state_mapping=mapping) as scope:
            if penalties is not None:
                row = penalties.penalize(
                    row, buffer, index, prompt, prompt_mask
                )
            probabilities = picker.compute_probabilities(row)
            token = picker.get_next_token(probabilities)
        new = [
            scope.get_current_value(v)
            if scope.get_current_value(v) is not None
            else s
            for v, s in zip(template_vars, seeds)
        ]
        return ops.reshape(token, ()), new

    rows = jax.vmap(one)

    @jax.jit
    def program(logits, slots, buffers, index, prompt, prompt_mask, seeds):
        picked = ops.take(logits, slots, axis=0)[:, None]
        return rows(picked, buffers, index, prompt, prompt_mask, seeds)

    return program


def _to_host(tree):
    return keras.tree.map_structure(np.asarray, tree)


def _seed_state(job):
    """The job's sampler seed states, kept on the host between picks."""
    if job.seed_state is None:
        job.seed_state = [np.asarray(v.value) for v in _variables(job)]
    return job.seed_state


def _variables(job):
    """The sampler's seed states (none for greedy)."""
    sampler = job.penalties if job.penalties is not None else job.picker
    return list(sampler.variables)


def _config_key(job):
    """The sampler's configuration but its seed (once a job)."""
    if job.sampler_key is None:
        sampler = job.penalties if job.penalties is not None else job.picker
        config = keras.saving.serialize_keras_object(sampler)
        job.sampler_key = json.dumps(
            _drop_seeds(config), sort_keys=True, default=str
        )
    return job.sampler_key


def _drop_seeds(config):
    if isinstance(config, dict):
        return {k: _drop_seeds(v) for k, v in config.items() if k != "seed"}
    if isinstance(config, list):
        return [_drop_seeds(v) for v in config]
    return config


def _width(job):
    return len(job.prompt_ids) + job.max_tokens + 1


def _bucket(n, low=MIN_WIDTH):
    return max(low, 1 << (int(n) - 1).bit_length())


def _buffers(job, width):
    """The token buffer `generate` would hold for this request alone, at
    `width` columns: `(buffer, index, prompt length, prompt mask)`."""
    prompt = len(job.prompt_ids)
    buffer = np.full((1, width), -1, "int32")
    buffer[0, :prompt] = job.prompt_ids
    buffer[0, prompt : prompt + len(job.generated)] = job.generated
    index = np.int32(prompt + len(job.generated))
    prompt_mask = np.arange(width)[None] < prompt
    return buffer, index, np.int32(prompt), prompt_mask
