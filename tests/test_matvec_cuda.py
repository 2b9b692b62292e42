"""The decoding-step CUDA kernel against plain JAX (needs an sm_90+ GPU).

Random inputs of the shapes a step gives it (and odd ones: K not a
multiple of the rows a block reads at once, N a multiple of 16 only), every
row count 1 to 8, the three kinds of weights, scales in float32 and
bfloat16. Tolerance: the bfloat16 output's rounding (a relative error of
1e-2 of the largest value; float32 sums in a different order).
"""

import keras
import numpy as np
import pytest

from tests.reference import relative_error


def sm90_or_skip():
    """The GPU's compute capability ("90"), or a skip: the step kernels
    are JAX's and need sm_90."""
    if keras.config.backend() != "jax":
        pytest.skip("the step kernels are JAX's")
    import jax

    if jax.default_backend() != "gpu":
        pytest.skip("no GPU")
    arch = jax.devices()[0].compute_capability.replace(".", "")
    if int(arch) < 90:
        pytest.skip("the kernels need sm_90")
    return arch


def _kernel_or_skip():
    arch = sm90_or_skip()
    from keras_rwkv.ops.matvec import jax_binding

    jax_binding.load(arch)
    return jax_binding


SHAPES = [
    [(2048, 2048)],
    [(2048, 2048)] * 4,
    [(2048, 7168), (2048, 2048)],
    [(7168, 2048)],
    [(100, 48), (33, 16), (2048, 80)],
    [(2048, 65536)],
]


@pytest.mark.parametrize("kind", [0, 1, 2])
@pytest.mark.parametrize("shapes", SHAPES, ids=str)
def test_kernel_matches_jax(kind, shapes):
    binding = _kernel_or_skip()
    import jax.numpy as jnp

    rng = np.random.default_rng(len(shapes) + 7 * kind)
    for rows in range(1, 9):
        flat = []
        for i, (k, n) in enumerate(shapes):
            flat.append(jnp.asarray(rng.normal(size=(rows, k)), jnp.bfloat16))
            if kind == 0:
                w = rng.normal(size=(k, n)) / np.sqrt(k)
                flat.append(jnp.asarray(w, jnp.bfloat16))
                continue
            flat.append(jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8))
            scale_dtype = jnp.bfloat16 if i % 2 else jnp.float32
            flat.append(jnp.asarray(rng.uniform(50, 500, n), scale_dtype))
            if kind == 2:
                flat.append(jnp.asarray(rng.uniform(0.5, 2, rows), jnp.float32))
        got = binding.ffi_call(kind, flat)
        want = binding.reference_call(kind, flat)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype
            g = np.asarray(g, np.float32)
            w = np.asarray(w, np.float32)
            assert relative_error(g, w) < 1e-2, (rows, g.shape)


def test_model_step_on_the_gpu_kernels(monkeypatch):
    """A bfloat16 model's decoding step on our kernels (the products at
    batch 1 and 3, the fused pieces at batch 1) gives XLA's logits and
    state, to bfloat16 precision."""
    _kernel_or_skip()
    from keras import ops

    from keras_rwkv import RWKV6Backbone
    from keras_rwkv.models.rwkv6 import rwkv6_projection
    from keras_rwkv.models.rwkv6 import rwkv6_step_fusion

    keras.utils.set_random_seed(0)
    backbone = RWKV6Backbone(
        vocabulary_size=512,
        num_layers=2,
        hidden_dim=256,
        intermediate_dim=896,
        mix_lora_dim=8,
        decay_lora_dim=16,
        dtype="bfloat16",
    )
    for batch in (1, 3):
        ids = np.random.default_rng(batch).integers(1, 512, (batch, 6))
        mask = np.ones_like(ids)
        _, state = backbone.call_with_state(ids[:, :5], mask[:, :5])

        def step(ids=ids, mask=mask, state=state):
            hidden, new = backbone.call_with_state(
                ids[:, 5:], mask[:, 5:], state
            )
            logits = backbone.token_embedding(hidden, reverse=True)
            return [
                ops.convert_to_numpy(ops.cast(t, "float32"))
                for t in (logits, new.layers()[0][2])
            ]

        with_kernels = step()
        with monkeypatch.context() as patch:
            patch.setattr(rwkv6_projection, "step_matvec", lambda: None)
            patch.setattr(rwkv6_step_fusion, "step_fused", lambda: None)
            without = step()
        for got, want in zip(with_kernels, without):
            assert relative_error(got, want) < 2e-2
