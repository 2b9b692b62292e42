"""Bad input at the generate/compile/sampler boundary gets a clear error
naming the bad value, before anything runs."""

import numpy as np
import pytest

from keras_rwkv import RWKV6Backbone
from keras_rwkv import RWKV6CausalLM
from keras_rwkv import RWKV6CausalLMPreprocessor
from keras_rwkv import RWKV6Tokenizer
from keras_rwkv.samplers import PenaltySampler
from tests.reference import TINY_WORLD


@pytest.fixture(scope="module")
def lm():
    backbone = RWKV6Backbone(**TINY_WORLD)
    pre = RWKV6CausalLMPreprocessor(RWKV6Tokenizer(), sequence_length=32)
    lm = RWKV6CausalLM(backbone, pre)
    lm.compile(sampler="greedy")
    return lm


@pytest.mark.parametrize("bad", [-1, 65536, 10**9])
def test_out_of_range_ids_are_refused(lm, bad):
    ids = np.array([[5, bad, 7]])
    with pytest.raises(ValueError, match=f"id {bad} is outside"):
        lm.generate({"token_ids": ids}, max_new_tokens=2)
    with pytest.raises(ValueError, match="ids 0 to 65535"):
        lm.prefill({"token_ids": ids})
    # A pad position may hold anything: it is never read.
    mask = np.array([[1, 0, 1]])
    out = lm.generate(
        {"token_ids": ids, "padding_mask": mask},
        max_new_tokens=2,
        stop_token_ids=None,
    )
    assert out["token_ids"][0][out["padding_mask"][0]][:2].tolist() == [5, 7]


def test_prompt_shapes_and_kinds(lm):
    with pytest.raises(ValueError, match="must match"):
        lm.generate(
            {
                "token_ids": np.ones((2, 4), int),
                "padding_mask": np.ones((2, 3)),
            },
            max_new_tokens=2,
        )
    with pytest.raises(ValueError, match="integer token ids"):
        lm.generate({"token_ids": np.array([[1.5, 2.0]])}, max_new_tokens=2)
    with pytest.raises(ValueError, match="needs a prompt"):
        lm.generate(None, max_new_tokens=2)
    with pytest.raises(ValueError, match="empty batch"):
        lm.generate([], max_new_tokens=2)
    with pytest.raises(ValueError, match="takes a string"):
        lm.generate([1, 2], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        lm.generate("Hi", max_new_tokens=0)


@pytest.mark.parametrize(
    "stop, message",
    [("x", "use 'auto'"), ([70000], "id 70000 is outside"), (5, "a list")],
)
def test_stop_ids_are_checked(lm, stop, message):
    with pytest.raises(ValueError, match=message):
        lm.generate("Hi", max_new_tokens=2, stop_token_ids=stop)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"repetition_penalty": float("nan")},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"presence_penalty": float("nan")},
        {"frequency_penalty": float("-inf")},
        {"penalty_decay": float("nan")},
        {"penalty_window": 2.5},
    ],
)
def test_non_finite_penalties_are_refused(kwargs):
    with pytest.raises(ValueError, match="must be"):
        PenaltySampler("greedy", **kwargs)


def test_unknown_sampler_names_fail_at_compile(lm):
    with pytest.raises(ValueError, match="Unknown sampler 'nonsense'"):
        lm.compile(sampler="nonsense")
    with pytest.raises(ValueError, match="Unknown sampler"):
        PenaltySampler("nonsense")
    lm.compile(sampler="greedy")
