"""PenaltySampler rules against small independent numpy implementations,
and the presence/frequency/decay rule against rwkv.utils.PIPELINE."""

import numpy as np
import pytest
import torch
from keras import ops

from keras_rwkv.samplers import PenaltySampler
from keras_rwkv.samplers.penalty_sampler import pipeline_unweighted_ids

V = 50


def fixed_logits(batch=2, seed=0):
    return (
        np.random.default_rng(seed).normal(0, 2, (batch, V)).astype("float32")
    )


def buffers():
    # Row 0: two left pads, prompt [3, 4, 3], generated [7, 3, 7, 9].
    # Row 1: prompt [5, 5, 5, 6, 1], generated [2, 2, 6, 2].
    tokens = np.array(
        [[0, 0, 3, 4, 3, 7, 3, 7, 9], [5, 5, 5, 6, 1, 2, 2, 6, 2]], "int32"
    )
    read = np.array([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9], bool)
    generated = np.zeros_like(read)
    generated[:, 5:] = True
    return tokens, read, generated


def apply(sampler, logits, tokens, read, generated):
    return ops.convert_to_numpy(
        sampler.apply_penalties(logits, tokens, read, generated)
    )


def numpy_repetition(logits, tokens, read, p, window=None, rng=None):
    out = logits.astype(np.float64).copy()
    for b in range(len(tokens)):
        seen = [int(t) for t, r in zip(tokens[b], read[b]) if r]
        if window is not None:
            seen = seen[-window:]
        for token in set(seen):
            c = seen.count(token)
            if rng is not None:
                lo, hi = rng
                c = 0 if c < lo else min(c, hi)
            factor = p**c
            if out[b, token] > 0:
                out[b, token] /= factor
            else:
                out[b, token] *= factor
    return out


@pytest.mark.parametrize(
    "window, rng", [(None, None), (4, None), (None, (2, 3)), (3, (1, 1))]
)
def test_repetition_penalty(window, rng):
    logits = fixed_logits()
    tokens, read, gen = buffers()
    sampler = PenaltySampler(
        "greedy",
        repetition_penalty=1.7,
        penalty_window=window,
        max_penalty_range=rng,
    )
    got = apply(sampler, logits, tokens, read, gen)
    ref = numpy_repetition(logits, tokens, read, 1.7, window, rng)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, logits)  # the rule did something


def numpy_presence_frequency(
    logits, tokens, generated, a_p, a_f, decay, unweighted=()
):
    out = logits.astype(np.float64).copy()
    for b in range(len(tokens)):
        gen = [int(t) for t, g in zip(tokens[b], generated[b]) if g]
        occurrence = {}
        for token in gen:  # PIPELINE's update order: decay, then add
            for k in occurrence:
                occurrence[k] *= decay
            w = 0.0 if token in unweighted else 1.0
            occurrence[token] = occurrence.get(token, 0.0) + w
        for token, occ in occurrence.items():
            out[b, token] -= a_p + occ * a_f
    return out


def test_presence_frequency_decay_and_ban():
    logits = fixed_logits()
    tokens, read, gen = buffers()
    sampler = PenaltySampler(
        "greedy",
        presence_penalty=0.3,
        frequency_penalty=0.5,
        penalty_decay=0.9,
        token_ban=[11, 12],
        unweighted_ids=[7],
        temperature=0.5,
    )
    got = apply(sampler, logits, tokens, read, gen)
    ref = numpy_presence_frequency(logits, tokens, gen, 0.3, 0.5, 0.9, [7])
    ref[:, [11, 12]] = -np.inf
    ref = ref / 0.5
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_against_rwkv_pipeline(monkeypatch):
    from rwkv.utils import PIPELINE
    from rwkv.utils import PIPELINE_ARGS

    vocab = 65536
    base = np.random.default_rng(3).normal(0, 1, vocab).astype("float32")

    class FixedModel:
        def forward(self, tokens, state):
            return torch.tensor(base), state

    pipeline = PIPELINE(FixedModel(), "rwkv_vocab_v20230424")
    space = pipeline.encode(" ")[0]
    digit = pipeline.encode("7")[0]
    hello = pipeline.encode("Hello")[0]
    script = [hello, space, hello, digit, 500, hello, space, 500, 42, hello]
    seen_logits = []

    def fake_sample(logits, **kwargs):
        seen_logits.append(logits.numpy().copy())
        return script[len(seen_logits) - 1]

    monkeypatch.setattr(pipeline, "sample_logits", fake_sample)
    args = PIPELINE_ARGS(
        alpha_presence=0.4,
        alpha_frequency=0.3,
        alpha_decay=0.95,
        token_ban=[17],
        token_stop=[],
    )
    pipeline.generate("Hi", token_count=len(script), args=args)

    sampler = PenaltySampler(
        "greedy",
        presence_penalty=0.4,
        frequency_penalty=0.3,
        penalty_decay=0.95,
        token_ban=[17],
    )
    assert {space, digit} <= set(sampler._resolved_unweighted_ids())
    for step, ref in enumerate(seen_logits):
        tokens = np.array([[9] + script[:step]], "int32")  # 9: a prompt id
        gen = np.zeros_like(tokens, bool)
        gen[0, 1:] = True
        got = apply(sampler, base[None], tokens, np.ones_like(gen), gen)[0]
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_pipeline_unweighted_ids():
    from keras_rwkv import RWKV6Tokenizer

    tok = RWKV6Tokenizer()
    ids = pipeline_unweighted_ids(tok)
    texts = {tok.id_to_token(i) for i in ids}
    assert {" ", "\t", "0", "9", "12"} <= texts
    assert all(t in " \t0123456789" for t in texts)


def test_composes_with_a_sampler_inside_generate():
    # Repetition penalty 1e9 on greedy: no token may repeat.
    import keras

    from keras_rwkv import RWKV6Backbone
    from keras_rwkv import RWKV6CausalLM

    keras.utils.set_random_seed(0)
    backbone = RWKV6Backbone(
        vocabulary_size=64,
        num_layers=1,
        hidden_dim=64,
        intermediate_dim=64,
        head_size=32,
        mix_lora_dim=4,
        decay_lora_dim=4,
    )
    lm = RWKV6CausalLM(backbone)
    lm.compile(sampler=PenaltySampler("greedy", repetition_penalty=1e9))
    out = lm.generate(
        {"token_ids": np.array([[1, 2, 3]])},
        max_new_tokens=20,
        stop_token_ids=None,
    )
    ids = out["token_ids"][0][out["padding_mask"][0]].tolist()
    assert len(ids) == 23 and len(set(ids)) == 23
    lm.compile(sampler="greedy")
    plain = lm.generate(
        {"token_ids": np.array([[1, 2, 3]])},
        max_new_tokens=20,
        stop_token_ids=None,
    )
    plain = plain["token_ids"][0][plain["padding_mask"][0]].tolist()
    assert len(set(plain)) < 23  # without the penalty it does repeat


def test_serialization_round_trip():
    import keras

    sampler = PenaltySampler(
        "top_p",
        repetition_penalty=1.2,
        penalty_window=64,
        max_penalty_range=(1, 5),
        presence_penalty=0.2,
        frequency_penalty=0.1,
        penalty_decay=0.99,
        token_ban=[0],
        temperature=0.8,
    )
    config = keras.saving.serialize_keras_object(sampler)
    clone = keras.saving.deserialize_keras_object(config)
    assert isinstance(clone, PenaltySampler)
    assert clone.get_config() == sampler.get_config()
    assert type(clone.sampler).__name__ == "TopPSampler"


def test_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        PenaltySampler(temperature=0)
    with pytest.raises(ValueError, match="penalty_decay"):
        PenaltySampler(penalty_decay=1.5)
    with pytest.raises(ValueError, match="max_penalty_range"):
        PenaltySampler(max_penalty_range=(5, 2))
