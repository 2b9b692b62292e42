"""The one-token decoding step on torch, as one compiled program.

Eager torch runs a step of a Keras model as thousands of small ops, each
behind Keras's Python dispatch, so a batch-1 step is host-bound
(benchmarks/RESULTS.md, "torch decode"). With `lm.compile(jit_compile=True)`
on torch (Keras's own switch for `torch.compile`, off by default there),
`generate` runs each step through a program built once per batch size:
`torch.export` traces `call_with_state` for one token (no Keras code is
left in it, so no guards over Keras layers run per step), then
`torch.compile` compiles the traced graph. The weights stay references to
the model's own tensors, so values assigned later (training) are used;
quantizing, LoRA and state tuning (on the task or the backbone) make a
new program.

On a GPU the program replays as CUDA graphs (torch.compile's
"reduce-overhead" mode): one launch a step instead of one a kernel
(benchmarks/RESULTS.md, "torch decode on one H200"). A graph's outputs
live in memory its next replay overwrites, and the next step reads them,
so each step's logits and state are copied out of it.
`KERAS_RWKV_TORCH_STEP_MODE` (`default`, `reduce-overhead`,
`max-autotune-no-cudagraphs`) overrides the choice.

Where tracing or compiling fails, the step runs eagerly with one warning.
"""

import warnings

import keras

from keras_rwkv.models.rwkv6.rwkv6_compiled import variables_mark
from keras_rwkv.utils import settings


def step_function(lm):
    """`lm.call_with_state`, or (torch with `jit_compile=True`) the same
    step through its compiled program, for one-token steps whose state is
    the per-layer list the decoding loop carries."""
    if (
        keras.config.backend() != "torch"
        or getattr(lm, "jit_compile", False) is not True
    ):
        return lm.call_with_state

    # The program is looked up again only when the batch's shape or the
    # variables' mark changes (a quantize or LoRA on the backbone alone:
    # the task's own drop every program), not over the state each step.
    found = {"seen": None, "key": None, "program": None}

    def step(token_ids, padding_mask, state):
        if not isinstance(state, list) or token_ids.shape[1] != 1:
            return lm.call_with_state(token_ids, padding_mask, state)
        seen = (tuple(token_ids.shape), variables_mark(lm))
        if found["seen"] != seen:
            key = ("torch_step", *seen, _signature(state))
            if key not in lm._compiled_functions:
                lm._compiled_functions[key] = _build(
                    lm, token_ids, padding_mask, state
                )
            found.update(
                seen=seen, key=key, program=lm._compiled_functions[key]
            )
        program = found["program"]
        if program is _EAGER:
            return lm.call_with_state(token_ids, padding_mask, state)
        try:
            logits, layers = program(token_ids, padding_mask, state)
        except Exception as error:  # compiling happens at the first call
            lm._compiled_functions[found["key"]] = found["program"] = _EAGER
            _warn(error)
            return lm.call_with_state(token_ids, padding_mask, state)
        return logits, None, layers

    return step


_EAGER = object()


def _signature(layers):
    return tuple(
        (tuple(t.shape), str(t.dtype), str(t.device))
        for layer in layers
        for t in layer
    )


def _build(lm, token_ids, padding_mask, layers):
    import torch

    class Step(torch.nn.Module):
        def forward(self, token_ids, padding_mask, layers):
            logits, _, new_layers = lm.call_with_state(
                token_ids, padding_mask, layers
            )
            return logits, new_layers

    # A bad setting is an error, not a warning.
    mode = settings.torch_step_mode(token_ids.device.type == "cuda")
    try:
        with torch.no_grad():
            exported = torch.export.export(
                Step(), (token_ids, padding_mask, layers), strict=False
            )
        module = exported.module()
        compiled = torch.compile(module, dynamic=False, mode=mode)
    except Exception as error:
        _warn(error)
        return _EAGER

    def run(token_ids, padding_mask, layers):
        with torch.no_grad():
            logits, layers = compiled(token_ids, padding_mask, layers)
        if graphs:
            logits = logits.clone()
            layers = [tuple(t.clone() for t in layer) for layer in layers]
        return logits, layers

    graphs = mode == "reduce-overhead"
    return run


def _warn(error):
    warnings.warn(
        "keras_rwkv: could not compile the torch decoding step "
        f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
        "decoding eagerly. Compile without jit_compile=True to silence this.",
        stacklevel=4,
    )
