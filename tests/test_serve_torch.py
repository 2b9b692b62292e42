"""`keras-rwkv serve`'s engine on torch with `jit_compile=True`: it decodes
through `generate`'s compiled step (its state the program's own buffers,
slots joining and leaving between steps) and gives what eager `generate`
gives. Runs in the torch pass."""

import threading

import keras
import keras_hub
import pytest

from keras_rwkv.serve import Engine
from keras_rwkv.serve import Job
from keras_rwkv.serve import Sampling
from keras_rwkv.serve import make_sampler
from tests.reference import save_tiny_world_preset

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "torch", reason="the torch engine"
)


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve_torch") / "preset"
    save_tiny_world_preset(path)
    return str(path)


def test_the_engine_decodes_through_the_compiled_step_like_generate(preset):
    lm = keras_hub.models.CausalLM.from_preset(preset)
    lm.compile(sampler="greedy", jit_compile=True)
    engine = Engine(lm, max_batch=2, cache_bytes=0)
    engine.start()  # builds the step and runs it once, before any request
    assert any(k[0] == "torch_step" for k in lm._compiled_functions)
    prompts = [
        f"Question {i}: what is {i * 13}?" * (1 + i % 3)
        for i in (1, 2, 3, 4, 5)
    ]
    lengths = [3, 9, 5, 12, 7]
    texts = {p: [] for p in prompts}
    done = {p: threading.Event() for p in prompts}

    def emitter(prompt):
        def emit(kind, data):
            if kind == "text":
                texts[prompt].append(data)
            else:
                done[prompt].set()

        return emit

    tokenizer = lm.preprocessor.tokenizer
    try:
        # Five requests on two slots: the later ones join slots freed
        # between steps, their read states copied into the program's.
        for prompt, n in zip(prompts, lengths):
            job = Job(
                tokenizer(prompt),
                make_sampler(Sampling(temperature=0)),
                n,
                emitter(prompt),
            )
            engine.submit(job)
        for prompt in prompts:
            assert done[prompt].wait(300), prompt
    finally:
        engine.stop()
    eager = keras_hub.models.CausalLM.from_preset(preset)
    eager.compile(sampler="greedy")
    for prompt, n in zip(prompts, lengths):
        want = eager.generate(prompt, max_new_tokens=n, strip_prompt=True)
        assert "".join(texts[prompt]) == want, prompt
    assert engine.counters["steps"] > max(lengths)
