"""The projections of a decoding step, kept on the GPU's matrix kernels.

At T = 1 and batch 1 a projection is `[1, K] @ [K, N]`. XLA rewrites a
vector-matrix product with `K * N < 10**7` (every C x C matrix of the
official models up to 3B) into a multiply and a column reduction, which
reads the weights at 0.65 TB/s on an H200 (15% of its bandwidth). Two rows
keep it a matrix product: 2.1 TB/s, and 4.2 TB/s for the feedforward's
C x F (benchmarks/RESULTS.md, "Decode step"). The second row is a copy of
the first and is dropped, so the result is the same.

`KERAS_RWKV_STEP_ROWS` sets the row count (1 turns this off); the default
is 2 on JAX with a GPU and 1 elsewhere, where it would only add work.
"""

import functools
import os

import keras

ROWS_ENV_VAR = "KERAS_RWKV_STEP_ROWS"


def step_rows():
    """How many rows a batch-1 decoding step's projections run as."""
    value = os.environ.get(ROWS_ENV_VAR, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(
                f"{ROWS_ENV_VAR}={value!r}: use a whole number >= 1 (1 "
                "turns the padding of batch-1 steps off)."
            )
        return int(value)
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
    LoRA or quantized), with a batch-1 step run as `step_rows()` rows."""
    if x.shape[0] == 1 and x.shape[1] == 1:
        rows = step_rows()
        if rows > 1:
            return layer(keras.ops.repeat(x, rows, axis=0))[:1]
    return layer(x)
