"""RWKV6CausalLM.generate: parity with BlinkDL, batching, state, stops."""

import keras
import numpy as np
import pytest
from keras import ops
from keras_hub.samplers import BeamSampler
from keras_hub.samplers import TopKSampler

from keras_rwkv import RWKV6Backbone
from keras_rwkv import RWKV6CausalLM
from keras_rwkv import RWKV6CausalLMPreprocessor
from keras_rwkv import RWKV6State
from keras_rwkv import RWKV6Tokenizer
from keras_rwkv.convert import convert_checkpoint
from tests.reference import SMALL
from tests.reference import TINY_WORLD
from tests.reference import blinkdl_model
from tests.reference import random_rwkv6_state_dict
from tests.reference import save_checkpoint


@pytest.fixture(scope="module")
def blinkdl_pair(tmp_path_factory):
    sd = random_rwkv6_state_dict(**SMALL, seed=11)
    path = save_checkpoint(tmp_path_factory.mktemp("g") / "m.pth", sd)
    return path, convert_checkpoint(path, dtype="float32", progress=False)


def id_lm(backbone, sampler="greedy"):
    lm = RWKV6CausalLM(backbone)
    lm.compile(sampler=sampler)
    return lm


def as_ids(*rows):
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), "int32")
    mask = np.zeros((len(rows), width), "int32")
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return {"token_ids": ids, "padding_mask": mask}


def generated(out, n):
    """The last n kept ids of each row."""
    return [
        row[m][-n:].tolist()
        for row, m in zip(out["token_ids"], out["padding_mask"])
    ]


@pytest.mark.parametrize("step_rows", ["1", "2"])
def test_greedy_matches_blinkdl_loop(blinkdl_pair, step_rows, monkeypatch):
    # Two rows is how a batch-1 step's projections run on a GPU
    # (`rwkv6_projection.py`); forced here to check the CPU gets the same.
    monkeypatch.setenv("KERAS_RWKV_STEP_ROWS", step_rows)
    path, backbone = blinkdl_pair
    prompt = [5, 17, 99, 3, 250, 42, 7]
    model = blinkdl_model(path)
    out, state = model.forward(prompt, None)
    ref = []
    for _ in range(32):
        token = int(np.argmax(out.numpy()))
        ref.append(token)
        out, state = model.forward([token], state)

    lm = id_lm(backbone)
    got = lm.generate(as_ids(prompt), max_new_tokens=32, stop_token_ids=None)
    assert generated(got, 32)[0] == ref


def test_batch_of_different_lengths_equals_each_alone(blinkdl_pair):
    _, backbone = blinkdl_pair
    lm = id_lm(backbone)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [40], [77, 78, 79]]
    batch = lm.generate(
        as_ids(*prompts), max_new_tokens=12, stop_token_ids=None
    )
    for i, p in enumerate(prompts):
        alone = lm.generate(as_ids(p), max_new_tokens=12, stop_token_ids=None)
        assert generated(batch, 12)[i] == generated(alone, 12)[0]


def test_max_length_is_each_rows_total_length(blinkdl_pair):
    # KerasHub's meaning: a short prompt in a mixed batch gets as many new
    # tokens as alone, and the batch equals each prompt alone.
    _, backbone = blinkdl_pair
    lm = id_lm(backbone)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [40], [77, 78, 79]]
    batch = lm.generate(as_ids(*prompts), max_length=20, stop_token_ids=None)
    for i, p in enumerate(prompts):
        alone = lm.generate(as_ids(p), max_length=20, stop_token_ids=None)
        kept = batch["token_ids"][i][batch["padding_mask"][i]].tolist()
        assert len(kept) == 20
        assert kept == alone["token_ids"][0][alone["padding_mask"][0]].tolist()
        assert kept[: len(p)] == p
    # The returned state covers each row's own output, nothing past it.
    _, state = lm.generate(
        as_ids(*prompts), max_length=20, stop_token_ids=None, return_state=True
    )
    for i, p in enumerate(prompts):
        _, alone = lm.generate(
            as_ids(p), max_length=20, stop_token_ids=None, return_state=True
        )
        np.testing.assert_allclose(
            ops.convert_to_numpy(state.wkv)[i],
            ops.convert_to_numpy(alone.wkv)[0],
            rtol=1e-4,
            atol=1e-5,
        )


def test_top_k_with_seed_is_unchanged_by_extra_padding(blinkdl_pair):
    _, backbone = blinkdl_pair
    prompts = [[5, 6, 7, 8, 9], [40, 41]]
    inputs = as_ids(*prompts)
    padded = {k: np.pad(v, ((0, 0), (30, 0))) for k, v in inputs.items()}
    outs = []
    for x in (inputs, padded):
        lm = id_lm(backbone, TopKSampler(k=20, seed=123))
        outs.append(
            generated(
                lm.generate(x, max_new_tokens=10, stop_token_ids=None), 10
            )
        )
    assert outs[0] == outs[1]
    # ... and it is really sampling: not the greedy continuation.
    greedy = id_lm(backbone).generate(
        inputs, max_new_tokens=10, stop_token_ids=None
    )
    assert outs[0] != generated(greedy, 10)


def test_state_continuation_equals_whole(blinkdl_pair, tmp_path):
    _, backbone = blinkdl_pair
    lm = id_lm(backbone)
    a, b = [9, 8, 7, 6, 5, 4, 3, 2, 1, 20, 30], [11, 12, 13]
    whole = lm.generate(as_ids(a + b), max_new_tokens=15, stop_token_ids=None)
    state = lm.prefill(as_ids(a))
    cont = lm.generate(
        as_ids(b), state=state, max_new_tokens=15, stop_token_ids=None
    )
    assert generated(cont, 15) == generated(whole, 15)

    state.save(tmp_path / "a.npz")
    loaded = RWKV6State.load(tmp_path / "a.npz")
    again = lm.generate(
        as_ids(b), state=loaded, max_new_tokens=15, stop_token_ids=None
    )
    assert generated(again, 15) == generated(whole, 15)
    # A batch-1 state serves a batch.
    two = lm.generate(
        as_ids(b, b), state=loaded, max_new_tokens=15, stop_token_ids=None
    )
    assert generated(two, 15) == generated(whole, 15) * 2


def test_returned_state_covers_the_output(blinkdl_pair):
    _, backbone = blinkdl_pair
    lm = id_lm(backbone)
    out, state = lm.generate(
        as_ids([3, 4, 5]),
        max_new_tokens=9,
        stop_token_ids=None,
        return_state=True,
    )
    ids = out["token_ids"][0][out["padding_mask"][0]].tolist()
    ref = lm.prefill(as_ids(ids))
    np.testing.assert_allclose(
        ops.convert_to_numpy(state.wkv),
        ops.convert_to_numpy(ref.wkv),
        rtol=1e-4,
        atol=1e-5,
    )


def test_stop_tokens_end_each_row(blinkdl_pair):
    _, backbone = blinkdl_pair
    lm = id_lm(backbone)
    prompts = [[5, 6, 7], [100, 101]]
    free = generated(
        lm.generate(as_ids(*prompts), max_new_tokens=12, stop_token_ids=None),
        12,
    )
    stop = free[0][3]
    out = lm.generate(
        as_ids(*prompts), max_new_tokens=12, stop_token_ids=[stop]
    )
    for i, ref in enumerate(free):
        kept = out["token_ids"][i][out["padding_mask"][i]].tolist()
        new = kept[len(prompts[i]) :]
        expected = ref[: ref.index(stop) + 1] if stop in ref else ref
        assert new == expected


def test_pad_id_as_stop_token_is_not_confused_with_padding(blinkdl_pair):
    # Pad and end of text are both id 0 in RWKV World: left pads and empty
    # generation slots must not count as "stopped".
    _, backbone = blinkdl_pair
    lm = id_lm(backbone)
    prompts = [[5, 6, 7, 8, 9, 10], [100]]
    free = generated(
        lm.generate(as_ids(*prompts), max_new_tokens=12, stop_token_ids=None),
        12,
    )
    assert all(0 not in row for row in free)
    out = lm.generate(as_ids(*prompts), max_new_tokens=12, stop_token_ids=[0])
    assert generated(out, 12) == free


def test_streaming_delivers_every_token(blinkdl_pair):
    _, backbone = blinkdl_pair
    lm = id_lm(backbone)
    seen = []
    out = lm.generate(
        as_ids([5, 6, 7]),
        max_new_tokens=10,
        stop_token_ids=None,
        stream=lambda t: seen.append(int(t[0])),
    )
    assert seen == generated(out, 10)[0]


def test_bucketing_reuses_the_compiled_program(blinkdl_pair):
    _, backbone = blinkdl_pair
    lm = id_lm(backbone)
    lm.generate(as_ids([1]), max_new_tokens=5, stop_token_ids=None)
    # One program reads the prompt, one decodes.
    programs = set(lm._compiled_functions)
    assert len(programs) == 2
    for prompt in ([1, 2, 3], [1, 2, 3, 4, 5], [9] * 11):
        lm.generate(as_ids(prompt), max_new_tokens=5, stop_token_ids=None)
    assert set(lm._compiled_functions) == programs
    lm.generate(as_ids([1, 2]), max_new_tokens=7, stop_token_ids=None)
    assert set(lm._compiled_functions) == programs  # same budget bucket
    # Streaming runs the same decode program, segment by segment.
    steps = []
    lm.generate(
        as_ids([1, 2]),
        max_new_tokens=9,
        stop_token_ids=None,
        stream=steps.append,
    )
    assert len(steps) == 9
    assert set(lm._compiled_functions) == programs


def test_beam_search_runs_and_contrastive_is_refused(blinkdl_pair):
    _, backbone = blinkdl_pair
    lm = id_lm(backbone, BeamSampler(num_beams=3))
    out = lm.generate(as_ids([5, 6, 7]), max_new_tokens=6, stop_token_ids=None)
    assert len(generated(out, 6)[0]) == 6
    lm = id_lm(backbone, "contrastive")
    with pytest.raises(ValueError, match="does not apply to RWKV"):
        lm.generate(as_ids([5, 6, 7]), max_new_tokens=6)


@pytest.fixture(scope="module")
def text_lm():
    keras.utils.set_random_seed(1)
    backbone = RWKV6Backbone(**TINY_WORLD)
    pre = RWKV6CausalLMPreprocessor(RWKV6Tokenizer(), sequence_length=64)
    lm = RWKV6CausalLM(backbone, pre)
    lm.compile(sampler="greedy")
    return lm


def test_text_in_text_out(text_lm):
    out = text_lm.generate("Hello", max_new_tokens=5, stop_token_ids=None)
    assert isinstance(out, str) and out.startswith("Hello")
    batch = text_lm.generate(
        ["Hello", "你好"], max_new_tokens=5, stop_token_ids=None
    )
    assert batch[0] == out and batch[1].startswith("你好")
    stripped = text_lm.generate(
        "Hello", max_new_tokens=5, stop_token_ids=None, strip_prompt=True
    )
    assert "Hello" + stripped == out


def test_length_errors_and_empty_prompts(text_lm):
    with pytest.raises(ValueError, match="leaves no room"):
        text_lm.generate("one two three four", max_length=3)
    with pytest.raises(ValueError, match="not both"):
        text_lm.generate("x", max_length=9, max_new_tokens=3)
    # max_length counts the prompt (KerasHub's meaning).
    ids = text_lm.generate(
        {"token_ids": np.array([[5, 6, 7]])}, max_length=10, stop_token_ids=None
    )
    assert ids["padding_mask"].sum() == 10
    # An empty prompt starts after the end-of-text token 0.
    empty = text_lm.generate("", max_new_tokens=4, stop_token_ids=None)
    zero = text_lm.generate(
        {"token_ids": np.array([[0]])}, max_new_tokens=4, stop_token_ids=None
    )
    assert empty == text_lm.preprocessor.tokenizer.detokenize(
        zero["token_ids"][0][1:].tolist()
    )
    state = text_lm.prefill("context")
    with pytest.raises(ValueError, match="empty prompt"):
        text_lm.generate("", state=state, max_new_tokens=3)


def test_state_errors(text_lm, blinkdl_pair):
    _, other = blinkdl_pair
    wrong = RWKV6State.zeros(other, 1)
    with pytest.raises(ValueError, match="another model"):
        text_lm.generate("hi", state=wrong, max_new_tokens=2)
    with pytest.raises(TypeError, match="RWKV6State"):
        text_lm.generate("hi", state={"wkv": 1}, max_new_tokens=2)


def test_state_file_format(tmp_path, text_lm):
    state = text_lm.prefill(["a b c", "d"])
    path = state.save(tmp_path / "s")
    assert path.endswith(".npz")
    with np.load(path, allow_pickle=False) as data:
        assert str(data["format"]) == "keras_rwkv.RWKV6State"
        assert data["wkv"].shape == (2, 2, 2, 32, 32)
    (tmp_path / "bad.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not an RWKV6State"):
        RWKV6State.load(tmp_path / "bad.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="not an RWKV6State"):
        RWKV6State.load(tmp_path / "other.npz")
