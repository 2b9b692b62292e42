"""RWKV6CausalLMPreprocessor: training packing, generation packing."""

import numpy as np
import pytest
from keras import ops

from keras_rwkv import RWKV6Backbone
from keras_rwkv import RWKV6CausalLMPreprocessor
from keras_rwkv import RWKV6Tokenizer

TEXTS = ["The quick brown fox jumps", "Hi", "你好，世界"]


@pytest.fixture(scope="module")
def tokenizer():
    return RWKV6Tokenizer()


def numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def test_training_batch(tokenizer):
    pre = RWKV6CausalLMPreprocessor(tokenizer, sequence_length=8)
    x, y, sw = pre(TEXTS)
    ids, mask = numpy(x["token_ids"]), numpy(x["padding_mask"]).astype(bool)
    y, sw = numpy(y), numpy(sw).astype(bool)
    for row, text in enumerate(TEXTS):
        expected = (tokenizer(text) + [0])[:9]  # text, end token 0
        n = len(expected)
        full = expected + [0] * (9 - n)
        np.testing.assert_array_equal(ids[row], full[:8])
        np.testing.assert_array_equal(y[row], full[1:])  # shifted by one
        assert mask[row].tolist() == [True] * min(n, 8) + [False] * (8 - n)
        # Weight 1 exactly where the next token is real (the end token
        # counts; pads never do).
        assert sw[row].tolist() == [True] * (n - 1) + [False] * (9 - n)


def test_no_end_token(tokenizer):
    pre = RWKV6CausalLMPreprocessor(
        tokenizer, sequence_length=6, add_end_token=False
    )
    x, y, sw = pre(["Hi"])
    assert numpy(x["padding_mask"]).sum() == len(tokenizer("Hi"))
    assert numpy(sw).sum() == len(tokenizer("Hi")) - 1


def test_generate_preprocess_left_pads_and_keeps_the_end(tokenizer):
    pre = RWKV6CausalLMPreprocessor(tokenizer, sequence_length=6)
    out = pre.generate_preprocess(TEXTS)
    ids, mask = numpy(out["token_ids"]), numpy(out["padding_mask"])
    for row, text in enumerate(TEXTS):
        expected = tokenizer(text)[-6:]
        assert ids[row, 6 - len(expected) :].tolist() == expected
        assert mask[row].tolist() == [0] * (6 - len(expected)) + [1] * len(
            expected
        )
    assert pre.generate_postprocess(out)[1:] == ["Hi", "你好，世界"]
    single = pre.generate_preprocess("Hi", sequence_length=4)
    assert numpy(single["token_ids"]).tolist() == [0, 0, 0] + tokenizer("Hi")


def test_inside_tf_data(tokenizer):
    tf = pytest.importorskip("tensorflow")
    pre = RWKV6CausalLMPreprocessor(tokenizer, sequence_length=8)
    ds = tf.data.Dataset.from_tensor_slices(TEXTS).batch(3).map(pre)
    x, y, sw = next(iter(ds))
    ref_x, ref_y, ref_sw = pre(TEXTS)
    np.testing.assert_array_equal(
        x["token_ids"].numpy(), numpy(ref_x["token_ids"])
    )
    np.testing.assert_array_equal(y.numpy(), numpy(ref_y))
    np.testing.assert_array_equal(sw.numpy(), numpy(ref_sw))
    gen = (
        tf.data.Dataset.from_tensor_slices(TEXTS)
        .batch(3)
        .map(pre.generate_preprocess)
    )
    g = next(iter(gen))
    ref = pre.generate_preprocess(TEXTS)
    np.testing.assert_array_equal(
        g["token_ids"].numpy(), numpy(ref["token_ids"])
    )


def test_preset_round_trip(tokenizer, tmp_path):
    RWKV6Backbone(
        vocabulary_size=65536,
        num_layers=1,
        hidden_dim=64,
        intermediate_dim=64,
        mix_lora_dim=4,
        decay_lora_dim=4,
    ).save_to_preset(str(tmp_path))
    pre = RWKV6CausalLMPreprocessor(tokenizer, sequence_length=12)
    pre.save_to_preset(str(tmp_path))
    loaded = RWKV6CausalLMPreprocessor.from_preset(str(tmp_path))
    assert loaded.sequence_length == 12
    a, b = pre(TEXTS), loaded(TEXTS)
    np.testing.assert_array_equal(
        numpy(a[0]["token_ids"]), numpy(b[0]["token_ids"])
    )
