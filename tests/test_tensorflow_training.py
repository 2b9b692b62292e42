"""fit on the TensorFlow backend (what the README's Python example gets
with no KERAS_BACKEND set): full fine-tuning, state tuning and LoRA, each
one SGD step in a TensorFlow child process, compared with the same step
on this process's backend."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from tests.reference import save_tiny_world_preset

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="compared with JAX; run once, in the JAX pass",
)

MODES = ("full", "state", "lora")
TEXTS = ["User: ping\n\nAssistant: pong", "A longer line of training text."]

# Shared by the child and this process: one SGD step of `mode`, then all
# weights by path. LoRA's random A matrices are set from numpy, so both
# backends start from the same weights.
STEP = textwrap.dedent(
    """
    import keras, numpy as np
    import keras_hub, keras_rwkv

    def one_step(preset, mode, texts):
        lm = keras_hub.models.CausalLM.from_preset(preset)
        lm.preprocessor.sequence_length = 16
        if mode == "state":
            lm.enable_state_tuning(time_shift=True)
        elif mode == "lora":
            lm.backbone.enable_lora(rank=2)
            rng = np.random.default_rng(0)
            for v in sorted(lm.trainable_variables, key=lambda v: v.path):
                if v.path.endswith("lora_kernel_a"):
                    v.assign(rng.normal(0, 0.1, v.shape).astype("float32"))
        lm.compile(optimizer=keras.optimizers.SGD(0.5))
        history = lm.fit(texts, batch_size=2, epochs=1, shuffle=False,
                         verbose=0)
        trainable = sorted(v.path for v in lm.trainable_variables)
        weights = {v.path: keras.ops.convert_to_numpy(v) for v in lm.weights}
        return history.history["loss"][0], trainable, weights
    """
)

CHILD = STEP + textwrap.dedent(
    """
    import json, sys
    preset, out, texts = sys.argv[1:]
    results = {}
    for mode in ("full", "state", "lora"):
        loss, trainable, weights = one_step(preset, mode, json.loads(texts))
        results[f"{mode}:loss"] = loss
        results[f"{mode}:trainable"] = np.array(trainable)
        results.update({f"{mode}/{k}": v for k, v in weights.items()})
    np.savez(out, **results)
    """
)


@pytest.mark.slow
def test_fit_on_tensorflow_equals_jax(tmp_path):
    preset = tmp_path / "preset"
    backbone = save_tiny_world_preset(preset, spread=None)
    before = {v.path: keras.ops.convert_to_numpy(v) for v in backbone.weights}

    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(preset),
            str(tmp_path / "tf.npz"),
            json.dumps(TEXTS),
        ],
        env=env,
        check=True,
        timeout=900,
    )
    got = np.load(tmp_path / "tf.npz")

    namespace = {}
    exec(STEP, namespace)
    for mode in MODES:
        loss, trainable, weights = namespace["one_step"](
            str(preset), mode, TEXTS
        )
        assert got[f"{mode}:trainable"].tolist() == trainable, mode
        assert abs(float(got[f"{mode}:loss"]) - loss) <= 1e-4 * abs(loss)
        for path, value in weights.items():
            tf_value = got[f"{mode}/{path}"]
            # Within 1e-4 of the weight's norm, plus 1e-2 of its step.
            step = np.linalg.norm(value - before.get(path, value))
            scale = max(float(np.linalg.norm(value)), 1e-6)
            error = np.linalg.norm(tf_value - value)
            assert error <= 1e-4 * scale + 1e-2 * step, (mode, path, error)
            if path in before and path not in trainable:
                # Frozen on both backends.
                np.testing.assert_array_equal(tf_value, before[path])
                np.testing.assert_array_equal(value, before[path])
        # The step moved the trained variables (LoRA's B starts at zero).
        moved = [
            p
            for p in trainable
            if not np.array_equal(
                got[f"{mode}/{p}"], before.get(p, np.zeros_like(weights[p]))
            )
        ]
        assert moved, mode
