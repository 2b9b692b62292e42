"""The TensorFlow backend imports and runs the backbone (in a subprocess,
since Keras picks its backend once per process)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from keras import ops

from keras_rwkv import RWKV6Backbone
from tests.reference import relative_error

SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np
    import keras_rwkv
    from keras import ops
    preset, ids_path, out_path = sys.argv[1:]
    backbone = keras_rwkv.RWKV6Backbone.from_preset(preset)
    ids = np.load(ids_path)
    mask = (ids != 0).astype("int32")
    out = backbone({"token_ids": ids, "padding_mask": mask})
    hidden, state = backbone.call_with_state(ids[:, :5], mask[:, :5])
    hidden2, _ = backbone.call_with_state(ids[:, 5:], mask[:, 5:], state)
    np.savez(out_path, out=ops.convert_to_numpy(out),
             pieces=ops.convert_to_numpy(hidden2))
    """
)


@pytest.mark.parametrize("backend", ["tensorflow"])
def test_backbone_runs_on(backend, tmp_path):
    backbone = RWKV6Backbone(
        vocabulary_size=50,
        num_layers=2,
        hidden_dim=128,
        intermediate_dim=256,
        mix_lora_dim=8,
        decay_lora_dim=16,
    )
    backbone.save_to_preset(str(tmp_path / "preset"))
    ids = np.random.default_rng(0).integers(1, 50, size=(2, 12))
    ids[1, :3] = 0  # left padding
    np.save(tmp_path / "ids.npy", ids)
    env = {**os.environ, "KERAS_BACKEND": backend}
    subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            str(tmp_path / "preset"),
            str(tmp_path / "ids.npy"),
            str(tmp_path / "out.npz"),
        ],
        env=env,
        check=True,
        timeout=600,
    )
    got = np.load(tmp_path / "out.npz")
    mask = (ids != 0).astype("int32")
    ref = ops.convert_to_numpy(
        backbone({"token_ids": ids, "padding_mask": mask})
    )
    assert relative_error(got["out"][mask == 1], ref[mask == 1]) <= 1e-5
    assert relative_error(got["pieces"], ref[:, 5:]) <= 1e-5
