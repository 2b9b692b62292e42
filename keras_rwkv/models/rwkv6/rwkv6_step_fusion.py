"""Which decoding steps take the fused step kernels, and how a layer calls
them.

At batch 1 a step's small operations (layer norms, the time mix's token
shift and decay LoRAs, the WKV step, group norm and gate) cost XLA ~20
kernels a layer, as long as the layer's weights take to stream
(benchmarks/RESULTS.md, "Decode step"). `keras_rwkv.ops.matvec.step_fused`
runs them as three kinds of kernel instead. The layers keep one code path:
they ask `fused_step_for(x)` and, given the ops, call them in place of the
few lines they replace; everything else (projections, LoRA, quantization,
state) stays as it is.
"""

import keras

from keras_rwkv.models.rwkv6.rwkv6_projection import kernel_step
from keras_rwkv.ops.matvec import step_fused

# Mask dtypes the kernels read as they are (others are cast first).
_MASK_DTYPES = ("int32", "bool", "float32", "bfloat16")


def fused_step_for(x):
    """The fused step ops for a layer input `x` `[B, T, C]`, or None: only
    for a bfloat16 step (T = 1) of batch 1, not distributed."""
    return step_fused() if kernel_step(x, max_rows=1) else None


def shapes_ok(hidden_dim, mix_rank, decay_rank, head_size):
    """Whether the fused time-mix kernels take a layer of these sizes
    (`mix_shapes_ok` in `ops/matvec/cuda/step_mix.cuh`; every
    official RWKV6 model does)."""
    return (
        head_size == 64
        and hidden_dim % 64 == 0
        and hidden_dim <= 6144
        and mix_rank % 8 == 0
        and mix_rank <= 64
        and decay_rank % 8 == 0
        and decay_rank <= 128
    )


def params(*vectors):
    """Per-channel parameter vectors as the kernels take them: all
    bfloat16 or all float32 (a model keeps them in one dtype; a mixed
    policy autocasts some, then they are all cast to float32)."""
    values = [keras.ops.convert_to_tensor(v) for v in vectors]
    dtypes = {keras.backend.standardize_dtype(v.dtype) for v in values}
    if len(dtypes) == 1 and dtypes <= {"bfloat16", "float32"}:
        return values
    return [keras.ops.cast(v, "float32") for v in values]


def step_mask(padding_mask):
    """The step's padding mask in a dtype the kernels read."""
    if keras.backend.standardize_dtype(padding_mask.dtype) in _MASK_DTYPES:
        return padding_mask
    return keras.ops.cast(padding_mask, "float32")


def norm(fused, layer, x, delta=None):
    """`layer(x)` (or `(layer(x + delta), x + delta)`) for a Keras
    `LayerNormalization`, on the fused kernel when it can take the layer.
    """
    plain = (
        fused is not None
        and layer.center
        and layer.scale
        and not getattr(layer, "rms_scaling", False)
        and layer.axis in (-1, [-1], (-1,), 2, [2])
    )
    if plain:
        gamma, beta = params(layer.gamma, layer.beta)
        return fused.add_norm(x, gamma, beta, layer.epsilon, delta)
    if delta is None:
        return layer(x)
    x = x + delta
    return layer(x), x
