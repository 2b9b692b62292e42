"""The forward pass `fit`, `evaluate` and `predict` run on torch with
`jit_compile=True`: one program per input shape, autograd through it.

Eagerly, a training step of the 1.6B (context 1024, state tuning) on an
H200 was ~500 ms of host time for ~56 ms of GPU work: thousands of ops,
each behind Keras's Python dispatch (benchmarks/RESULTS.md, "torch on one
H200"). Keras's own switch, `torch.compile` of the whole train step,
traces Keras's trainer too and breaks its graph on it. Here instead
`torch.export` traces the model's forward alone, with every weight an
input (so gradients reach the variables' own tensors, and a weight
assigned or frozen later is seen), and `torch.compile` compiles the
traced graph, forward and backward (`KERAS_RWKV_TORCH_TRAIN_MODE`:
torch.compile's mode, by default on a GPU "reduce-overhead", whose CUDA
graphs took the 1.6B's state-tuning step from 67 to 56 ms on an H100; or
`trace`, the traced graph run as it is, quick to build, the default on a
CPU). Keras's train step, loss, metrics and optimizer run as before
around it.

Whether each row's tokens are one run (which picks the token shift's
form) is read from the mask before the program runs: one wait for the
device a step, and a program for each answer.

A batch with fewer rows than one already compiled for (an epoch's last)
runs through that program, padded with rows of pads.

Where tracing or compiling fails, the forward runs eagerly with one
warning. LoRA, state tuning and quantizing (on the task or the backbone)
make new programs; so does `compile`.
"""

import contextlib

import keras

from keras_rwkv.models.rwkv6.rwkv6_compiled import variables_mark
from keras_rwkv.models.rwkv6.rwkv6_token_shift import mask_contiguous
from keras_rwkv.models.rwkv6.rwkv6_torch_step import EAGER
from keras_rwkv.models.rwkv6.rwkv6_torch_step import compiling
from keras_rwkv.models.rwkv6.rwkv6_torch_step import export
from keras_rwkv.models.rwkv6.rwkv6_torch_step import warn_eager
from keras_rwkv.models.rwkv6.rwkv6_torch_step import without_no_op_casts
from keras_rwkv.utils import settings


def torch_forward(lm, inputs):
    """The logits of `lm(inputs)` through its program (see the module
    docstring), or None where that does not apply: another backend,
    `jit_compile` off, symbolic inputs, or inputs other
    than `{"token_ids", "padding_mask"}`."""
    if (
        not compiling(lm)
        or not isinstance(inputs, dict)
        or set(inputs) != {"token_ids", "padding_mask"}
        or any(isinstance(t, keras.KerasTensor) for t in inputs.values())
    ):
        return None
    token_ids = keras.ops.convert_to_tensor(inputs["token_ids"], "int32")
    padding_mask = keras.ops.convert_to_tensor(inputs["padding_mask"], "int32")
    length = token_ids.shape[1]
    contiguous = length == 1 or mask_contiguous(padding_mask)
    mark = variables_mark(lm)
    variables = _weights(lm, mark)
    key = (
        "torch_forward",
        tuple(token_ids.shape),
        tuple(padding_mask.shape),
        mark,
        contiguous,
    )
    pad = 0
    if key not in lm._compiled_functions:
        larger = _larger_batch(lm, key)
        if larger is None:
            lm._compiled_functions[key] = _build(
                lm, variables, token_ids, padding_mask, contiguous
            )
        else:
            key, pad = larger, larger[1][0] - token_ids.shape[0]
            token_ids, padding_mask = _pad_rows(token_ids, padding_mask, pad)
    program = lm._compiled_functions[key]
    if program is not EAGER:
        try:
            logits = program(
                [v.value for v in variables], token_ids, padding_mask
            )
            return logits[: logits.shape[0] - pad]
        except Exception as error:  # torch.compile compiles at a first call
            lm._compiled_functions[key] = EAGER
            warn_eager(error, "forward pass")
    return None


@contextlib.contextmanager
def keras_compile_off(lm):
    """Keras's trainer builds its train, test and predict functions
    without its own `torch.compile` (see the module docstring)."""
    if not compiling(lm):
        yield
        return
    lm.jit_compile = False
    try:
        yield
    finally:
        lm.jit_compile = True


def flat_for_torch_loss(y, y_pred, sample_weight):
    """On torch, `[B, T]` labels and `[B, T, V]` logits (and weights) as
    `[B * T]` and `[B * T, V]`: the same per-token losses, but Keras's
    torch cross-entropy moves the class axis of 3-D logits to dim 1, where
    torch's softmax kernel is ~100x slower than over the last axis (106 of
    the 163 ms of device time of a 1.6B state-tuning step, context 1024,
    on an H200)."""
    if (
        keras.config.backend() != "torch"
        or y_pred is None
        or len(y_pred.shape) != 3
        or y is None
        or len(y.shape) != 2
        or (sample_weight is not None and sample_weight.shape != y.shape)
    ):
        return y, y_pred, sample_weight
    ops = keras.ops
    y_pred = ops.reshape(y_pred, (-1, y_pred.shape[-1]))
    y = ops.reshape(y, (-1,))
    if sample_weight is not None:
        sample_weight = ops.reshape(sample_weight, (-1,))
    return y, y_pred, sample_weight


def _larger_batch(lm, key):
    """The key of a program for the same length, mask form and variables
    but more rows, or None. An epoch's last batch is often smaller: it
    runs through that program, padded with rows of pads, rather than wait
    minutes for a compile of its own (rows never mix, so the real rows'
    logits are the same)."""
    _, shape, mask_shape, *rest = key
    if shape[0] != mask_shape[0]:
        return None
    for other in lm._compiled_functions:
        if (
            other[0] == "torch_forward"
            and list(other[3:]) == rest
            and other[1][1:] == shape[1:]
            and other[2][1:] == mask_shape[1:]
            and other[1][0] == other[2][0] > shape[0]
            and lm._compiled_functions[other] is not EAGER
        ):
            return other
    return None


def _pad_rows(token_ids, padding_mask, pad):
    """`pad` rows of pads (id 0, mask 0) after the batch's own."""
    import torch

    return (
        torch.cat(
            [token_ids, token_ids.new_zeros((pad, *token_ids.shape[1:]))]
        ),
        torch.cat(
            [
                padding_mask,
                padding_mask.new_zeros((pad, *padding_mask.shape[1:])),
            ]
        ),
    )


def _weights(lm, mark):
    """The model's weights, listed once per variables mark (listing walks
    every layer: ~6 ms for the 1.6B)."""
    key = ("torch_forward_weights", mark)
    if key not in lm._compiled_functions:
        lm._compiled_functions[key] = list(lm.weights)
    return lm._compiled_functions[key]


def _build(lm, variables, token_ids, padding_mask, contiguous):
    import torch

    def forward(values, token_ids, padding_mask):
        mapping = list(zip(variables, values))
        with keras.StatelessScope(state_mapping=mapping):
            logits, _, _ = lm.call_with_state(
                token_ids, padding_mask, None, contiguous
            )
        return logits

    # A bad setting is an error, not a warning.
    mode = settings.torch_train_mode(token_ids.device.type == "cuda")
    try:
        values = [v.value for v in variables]
        module = without_no_op_casts(
            export(forward, values, token_ids, padding_mask, grad=True)
        )
        if mode == "trace":
            return module
        compiled = torch.compile(module, dynamic=False, mode=mode)
    except Exception as error:
        warn_eager(error, "forward pass")
        return EAGER
    if mode not in ("reduce-overhead", "max-autotune"):
        return compiled

    def replayed(values, token_ids, padding_mask):
        # torch's CUDA graphs rewrite their outputs at the next replay
        # (`predict` keeps every batch's): each call is a step of its own,
        # its logits a copy.
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(values, token_ids, padding_mask).clone()

    return replayed
