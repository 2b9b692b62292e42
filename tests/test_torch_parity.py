"""torch decodes as JAX does: greedy generation (with penalties, a batch
of unequal prompts, a state carried over) on a tiny random World model
gives the same tokens on both backends, torch eager and with its
compiled decoding step. The torch side runs in a child
process (Keras picks its backend once a process); the test runs in the
JAX pass."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import pytest

from tests.reference import save_tiny_world_preset

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="compares a torch child with this JAX process",
)

PROMPTS = ["The capital of France is", "Hi"]
NEW = 12


def decode(preset, prompts, new, jit_compile=False):
    """Greedy with penalties on a batch, then a continuation from the
    returned state: the texts of both. `jit_compile` is the task's
    (on torch: the compiled decoding step)."""
    import keras_hub

    from keras_rwkv.samplers import PenaltySampler

    lm = keras_hub.models.CausalLM.from_preset(preset)
    lm.compile(
        sampler=PenaltySampler(
            "greedy", presence_penalty=0.4, frequency_penalty=0.3
        ),
        # Only when asked: the JAX side keeps the task's default.
        **({"jit_compile": True} if jit_compile else {}),
    )
    first, state = lm.generate(
        prompts, max_new_tokens=new, return_state=True, stop_token_ids=None
    )
    second = lm.generate(
        [" and"] * len(prompts),
        state=state,
        max_new_tokens=new,
        stop_token_ids=None,
    )
    return {"first": list(first), "second": list(second)}


CHILD = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from tests.test_torch_parity import decode
    preset, prompts, new, jit, out = sys.argv[2:]
    with open(out, "w") as f:
        json.dump(decode(preset, json.loads(prompts), int(new), jit == "1"), f)
    """
)


@pytest.mark.parametrize("torch_jit", [False, True], ids=["eager", "compiled"])
def test_torch_greedy_equals_jax_greedy(tmp_path, torch_jit):
    preset = tmp_path / "preset"
    save_tiny_world_preset(preset)
    expected = decode(str(preset), PROMPTS, NEW)
    out = tmp_path / "torch.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            root,
            str(preset),
            json.dumps(PROMPTS),
            str(NEW),
            "1" if torch_jit else "0",
            str(out),
        ],
        env=env,
        check=True,
        timeout=600,
    )
    got = json.loads(out.read_text())
    # Not a trivial pass: the texts are long and differ between rows.
    assert all(len(t) > len(p) for t, p in zip(expected["first"], PROMPTS))
    assert expected["first"][0] != expected["first"][1]
    assert got == expected
