"""Parity with BlinkDL's official `rwkv` package (CPU fp32) on random
checkpoints. Tolerance: 1e-4 relative (max |diff| / max |reference|)."""

import numpy as np
import pytest
from keras import ops

from keras_rwkv.convert import convert_checkpoint
from tests.reference import LORA7B
from tests.reference import SMALL
from tests.reference import blinkdl_forward
from tests.reference import blinkdl_model
from tests.reference import random_rwkv6_state_dict
from tests.reference import relative_error
from tests.reference import save_checkpoint

TOL = 1e-4


@pytest.fixture(scope="module", params=["small_h3", "lora_7b_dims"])
def checkpoint(request, tmp_path_factory):
    dims = SMALL if request.param == "small_h3" else LORA7B
    sd = random_rwkv6_state_dict(**dims, seed=len(request.param))
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    save_checkpoint(path, sd)
    return path, dims


def test_logits_and_state_match_blinkdl(checkpoint):
    path, dims = checkpoint
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, dims["vocab"], size=24).tolist()

    ref_logits, (ref_att, ref_wkv, ref_ffn), _ = blinkdl_forward(
        blinkdl_model(path), tokens
    )
    backbone = convert_checkpoint(path, dtype="float32", progress=False)
    assert backbone.num_heads == dims["hidden"] // 64
    assert backbone.mix_lora_dim == dims["d_mix"]
    assert backbone.decay_lora_dim == dims["d_dec"]
    hidden, state = backbone.call_with_state(np.array([tokens]))
    logits = ops.convert_to_numpy(
        backbone.token_embedding(hidden, reverse=True)
    )[0]
    assert relative_error(logits, ref_logits) <= TOL
    shift = ops.convert_to_numpy(state.shift)[0]
    assert relative_error(shift[:, 0], ref_att) <= TOL
    assert relative_error(shift[:, 1], ref_ffn) <= TOL
    assert relative_error(ops.convert_to_numpy(state.wkv)[0], ref_wkv) <= TOL


def test_continuation_from_state_matches_blinkdl(checkpoint):
    path, dims = checkpoint
    rng = np.random.default_rng(2)
    first = rng.integers(1, dims["vocab"], size=13).tolist()
    second = rng.integers(1, dims["vocab"], size=9).tolist()
    model = blinkdl_model(path)
    _, _, ref_state = blinkdl_forward(model, first)
    ref_logits, _, _ = blinkdl_forward(model, second, ref_state)

    backbone = convert_checkpoint(path, dtype="float32", progress=False)
    _, state = backbone.call_with_state(np.array([first]))
    hidden, _ = backbone.call_with_state(np.array([second]), state=state)
    logits = ops.convert_to_numpy(
        backbone.token_embedding(hidden, reverse=True)
    )[0]
    assert relative_error(logits, ref_logits) <= TOL
