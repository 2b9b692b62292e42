"""The projections of a decoding step, kept at the speed of the weights.

A decoding step (T = 1) at small batch reads every weight once and does
little else, so its projections must stream the weights at the card's
rate. XLA does not: it rewrites `[1, K] @ [K, N]` with `K * N < 10**7`
(every C x C matrix up to 3B) into a column reduction, 0.65 TB/s on an
H200, and even padded to two rows its GEMM reads C x C at 2.1 TB/s
(benchmarks/RESULTS.md, "Decode step").

So, inside the same layers (one code path for sequence and step mode):
- where the step kernel runs (`keras_rwkv.ops.matvec`: JAX, sm_90+),
  `project_many` sends a batch-1 step's plain `Dense` projections to it
  (bfloat16, or Keras's weight-only int8), up to four matrices of one kind
  in one launch;
- elsewhere, and for a `Dense` it does not take (LoRA, a bias, float32),
  a batch-1 step's input is padded to `step_rows()` rows (2 on JAX with a
  GPU, 1 elsewhere; `KERAS_RWKV_STEP_ROWS`), which keeps XLA on a GEMM;
  the copy is dropped.
"""

import functools

import keras

from keras_rwkv.ops.matvec import step_matvec
from keras_rwkv.utils import settings

ROWS_ENV_VAR = settings.STEP_ROWS_ENV_VAR
# Rows of a step the kernel takes. It runs 1 to 8, but beyond one row
# XLA's GEMM is faster (H200: batch 8 decode 1,931 tok/s on the kernel,
# 3,512 on XLA; benchmarks/RESULTS.md, "Decode step kernel").
KERNEL_MAX_ROWS = 1
KERNEL_MAX_MATRICES = 4
# The kernel's kinds taken here (`ops/matvec/jax_binding.py`): bfloat16
# weights, and int8 weights with a bfloat16 input (weight-only int8).
BF16, INT8 = 0, 1


def step_rows():
    """How many rows a batch-1 decoding step's projections run as."""
    forced = settings.step_rows()
    if forced is not None:
        return forced
    return _default_rows()


@functools.cache
def _default_rows():
    # Fixed for the process; cached because torch runs this eagerly, for
    # every projection of every step.
    if keras.config.backend() != "jax":
        return 1
    import jax

    return 2 if jax.default_backend() == "gpu" else 1


def project(layer, x):
    """`layer(x)` for `x` of shape `[B, T, K]` (a Dense, possibly with
    LoRA or quantized), run as fast as a step can."""
    return project_many([(layer, x)])[0]


def project_many(pairs):
    """`[layer(x) for layer, x in pairs]`, the step kernel's share of them
    in one launch per kind of weight.

    Args:
        pairs: `(Dense layer, x [B, T, K])` pairs.

    Returns:
        The outputs `[B, T, N]`, in order.
    """
    outputs = [None] * len(pairs)
    groups = {}
    op = _kernel_for(pairs[0][1])
    for i, (layer, x) in enumerate(pairs):
        found = _kernel_operands(layer, x) if op is not None else None
        if found is None:
            outputs[i] = _project_xla(layer, x)
        else:
            kind, operands = found
            groups.setdefault(kind, []).append((i, operands))
    for kind, members in groups.items():
        for start in range(0, len(members), KERNEL_MAX_MATRICES):
            chunk = members[start : start + KERNEL_MAX_MATRICES]
            flat = [a for _, operands in chunk for a in operands]
            for (i, _), y in zip(chunk, op(kind, flat)):
                outputs[i] = keras.ops.expand_dims(y, 1)
    return outputs


def _project_xla(layer, x):
    if x.shape[0] == 1 and x.shape[1] == 1:
        rows = step_rows()
        if rows > 1:
            return layer(keras.ops.repeat(x, rows, axis=0))[:1]
    return layer(x)


def kernel_step(x, max_rows=KERNEL_MAX_ROWS):
    """Whether `x` `[B, T, C]` is a step our CUDA step kernels take: T = 1,
    B <= `max_rows`, bfloat16, the model not distributed (its weights
    would be sharded: XLA partitions its own matmul, not our kernels)."""
    batch, seq_len = x.shape[0], x.shape[1]
    if seq_len != 1 or batch is None or batch > max_rows:
        return False
    if keras.backend.standardize_dtype(x.dtype) != "bfloat16":
        return False
    return keras.distribution.distribution() is None


def _kernel_for(x):
    """The step kernel for a step input `x`, or None."""
    return step_matvec() if kernel_step(x) else None


def _kernel_operands(layer, x):
    """`(kind, operands)` for the kernel, or None where it does not apply:
    only a plain `Dense` (no LoRA, bias or activation) with bfloat16
    weights, or Keras's weight-only int8 (per-column scales)."""
    if type(layer) is not keras.layers.Dense or layer.lora_enabled:
        return None
    if layer.use_bias or layer.activation not in (
        None,
        keras.activations.linear,
    ):
        return None
    if layer.kernel.shape[1] % 16:
        return None
    x2 = keras.ops.reshape(x, (x.shape[0], x.shape[2]))
    mode = layer.quantization_mode
    if mode == "int8":
        return _int8_operands(layer, x2)
    if mode is not None:
        return None
    kernel = keras.ops.convert_to_tensor(layer.kernel)
    if keras.backend.standardize_dtype(kernel.dtype) != "bfloat16":
        return None
    return BF16, (x2, kernel)


def _int8_operands(layer, x2):
    """Keras's weight-only int8 `Dense` on the kernel: `x @ W /
    kernel_scale`, as `Dense._int8_call` computes it."""
    # Keras's default int8 also quantizes the input (W8A8). The kernel has
    # that form (kind 2), but the quantizer's XLA kernels make a step
    # slower than bfloat16 either way (H100: 407 tok/s on the kernel, 416
    # on XLA's GEMMs, bfloat16 463-464; benchmarks/RESULTS.md), so it
    # stays on XLA, as Keras runs it.
    if getattr(layer, "inputs_quantizer", None):
        return None
    kernel = keras.ops.convert_to_tensor(layer.kernel)  # int8, no LoRA
    scale = keras.ops.convert_to_tensor(layer.kernel_scale)
    if len(scale.shape) != 1 or scale.shape[0] != kernel.shape[1]:
        return None  # not per column
    return INT8, (x2, kernel, scale)
