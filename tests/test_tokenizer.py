"""RWKV6Tokenizer against BlinkDL's TRIE_TOKENIZER (the official one)."""

import random

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

from keras_rwkv import RWKV6Backbone
from keras_rwkv import RWKV6Tokenizer
from keras_rwkv.models.rwkv6.rwkv6_tokenizer import BUNDLED_VOCAB

SNIPPETS = [
    "The quick brown fox jumps over the lazy dog. ",
    "It's 3:45pm — naïve café, résumé, Straße, ÆØÅ. ",
    "我们今天去公园散步，天气非常好。人工智能正在改变世界。",
    "日本語のテキスト：カタカナ、ひらがな、漢字。東京タワー！",
    "한국어 문장도 조금 넣습니다. ",
    "Русский текст и ελληνικά γράμματα. ",
    "😀🎉🚀👍🏽🧑‍💻🇯🇵 ",
    "def foo(x: int) -> int:\n    return x * 2  # comment\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }\n",
    '{"key": [1, 2.5, null], "nested": {"a": "b"}}\n',
    "\t\t  \n\n    \r\n",
    " " * 40,
    "\n" * 7,
    "<|endoftext|> ### User: hi\nAssistant: hello\n\n",
    "\x00\x01\x1f\x7f",
    "0123456789" * 3,
]


@pytest.fixture(scope="module")
def tokenizer():
    return RWKV6Tokenizer()


@pytest.fixture(scope="module")
def reference():
    return TRIE_TOKENIZER(BUNDLED_VOCAB)


def mixed_corpus(n_bytes, seed=0):
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_bytes:
        if rng.random() < 0.1:
            # Random code points, including rare CJK and astral planes.
            s = "".join(chr(rng.randint(0x20, 0x2FFFF)) for _ in range(5))
            s = s.encode("utf-8", "ignore").decode("utf-8", "ignore")
        else:
            s = rng.choice(SNIPPETS)
        parts.append(s)
        size += len(s.encode("utf-8"))
    return "".join(parts)


def test_ids_match_trie_on_a_megabyte(tokenizer, reference):
    corpus = mixed_corpus(1_100_000)
    assert len(corpus.encode("utf-8")) >= 1_000_000
    # Lines and whole corpus: boundaries must not matter.
    ours = tokenizer.tokenize(corpus)
    assert ours == reference.encode(corpus)
    lines = corpus.split("\n")[:2000]
    assert tokenizer.tokenize(lines) == [reference.encode(s) for s in lines]
    assert tokenizer.detokenize(ours) == corpus


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_hypothesis_strings_match_trie_and_round_trip(text):
    tokenizer, reference = _shared()
    ids = tokenizer.tokenize(text)
    assert ids == reference.encode(text)
    assert tokenizer.detokenize(ids) == text


_SHARED = []


def _shared():
    if not _SHARED:
        _SHARED.extend([RWKV6Tokenizer(), TRIE_TOKENIZER(BUNDLED_VOCAB)])
    return _SHARED


def test_shapes_of_inputs_and_outputs(tokenizer):
    assert tokenizer("Hello") == tokenizer.tokenize("Hello")
    assert isinstance(tokenizer("Hello"), list)
    batch = tokenizer(["Hello", "", "你好"])
    assert len(batch) == 3 and batch[1] == []
    assert tokenizer(np.array(["Hello", "你好"])) == [batch[0], batch[2]]
    assert tokenizer.detokenize(np.array(batch[0])) == "Hello"
    assert tokenizer.detokenize([batch[0], batch[2]]) == ["Hello", "你好"]
    assert tokenizer.detokenize(batch[0][0]) == "Hello"


def test_special_ids(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.end_token_id == 0
    assert tokenizer.start_token_id is None
    assert tokenizer.vocabulary_size() == 65530
    # 0 and the ids without token decode to nothing.
    hello = tokenizer("Hello")
    assert tokenizer.detokenize([0] + hello + [65535, 0]) == "Hello"


@pytest.mark.parametrize("dtype", ["int32", "int64", "uint16", "uint64"])
def test_ids_decode_as_trie_from_lists_and_arrays(tokenizer, reference, dtype):
    # Random ids over the whole range: 0 and the ids without a token
    # (65530..) give nothing; TRIE's decoder only takes known ids.
    ids = np.random.default_rng(0).integers(0, 65536, size=(3, 5000))
    want = [
        reference.decodeBytes([i for i in row if i in reference.idx2token])
        for row in ids.tolist()
    ]
    array = ids.astype(dtype)
    assert [tokenizer.ids_to_bytes(row) for row in array] == want
    assert [tokenizer.ids_to_bytes(row) for row in ids.tolist()] == want
    text = [w.decode("utf-8", "replace") for w in want]
    assert tokenizer.detokenize(array) == text
    assert tokenizer.detokenize(array[1]) == text[1]
    strided = array[:, ::2]  # a view, not contiguous
    assert tokenizer.ids_to_bytes(strided[2]) == reference.decodeBytes(
        [i for i in ids[2, ::2].tolist() if i in reference.idx2token]
    )


@pytest.mark.parametrize("longest", [8, 16, 128])
def test_ids_of_short_and_long_tokens_decode_as_trie(
    tokenizer, reference, longest
):
    """Ids whose tokens are all up to 8, up to 16 bytes, or longer (each
    decodes its own way: fixed-width rows or the general gather), with
    ids that give nothing among them, against TRIE."""
    rng = np.random.default_rng(longest)
    known = [i for i, t in reference.idx2token.items() if len(t) <= longest]
    top = [i for i in known if len(reference.idx2token[i]) > longest // 2]
    picked = rng.choice(known, 3000).tolist() + rng.choice(top, 5).tolist()
    rng.shuffle(picked)
    want = reference.decodeBytes(picked)
    with_empty = picked[:100] + [0, 65533] + picked[100:] + [0]
    assert tokenizer.ids_to_bytes(with_empty) == want
    assert tokenizer.ids_to_bytes(np.array(with_empty, "uint16")) == want
    assert tokenizer.ids_to_bytes([0, 65535]) == b""
    assert tokenizer.ids_to_bytes(picked[:1]) == reference.decodeBytes(
        picked[:1]
    )


def test_bad_ids_in_arrays_are_named(tokenizer):
    with pytest.raises(ValueError, match="Token id -3 is out of range"):
        tokenizer.detokenize(np.array([[5, -3]], "int32"))
    with pytest.raises(ValueError, match=f"Token id {2**63 + 5} is out"):
        tokenizer.detokenize(np.array([5, 2**63 + 5], "uint64"))
    with pytest.raises(ValueError, match="Token id 65536 is out"):
        tokenizer.ids_to_bytes(np.array([65536]))
    with pytest.raises(ValueError, match="flat sequence"):
        tokenizer.ids_to_bytes(np.ones((2, 3), "int32"))
    assert tokenizer.ids_to_bytes(np.array([], "int32")) == b""
    assert tokenizer.ids_to_bytes(np.array([0, 65535])) == b""


def test_vocabulary_lookups(tokenizer, reference):
    vocab = tokenizer.get_vocabulary()
    assert len(vocab) == 65529
    for token_id in (1, 256, 257, 1000, 33155, 65529):
        token = tokenizer.id_to_token(token_id)
        raw = token if isinstance(token, bytes) else token.encode("utf-8")
        assert raw == reference.idx2token[token_id]
        assert tokenizer.token_to_id(token) == token_id
    assert isinstance(tokenizer.id_to_token(200), bytes)  # a lone byte
    with pytest.raises(KeyError):
        tokenizer.token_to_id("definitely not a token ✓✓✓")
    with pytest.raises(ValueError, match="has no token"):
        tokenizer.id_to_token(0)


def test_invalid_utf8_decodes_without_raising(tokenizer):
    ids = tokenizer("你好🎉")
    # Stop inside the emoji: the default "replace" gives U+FFFD.
    assert tokenizer.detokenize(ids[:-1]) == "你好\ufffd"
    lone_byte = tokenizer.token_to_id(b"\xff")
    assert tokenizer.detokenize([lone_byte]) == "\ufffd"
    ignoring = RWKV6Tokenizer(errors="ignore")
    assert ignoring.detokenize(ids[:-1]) == "你好"
    strict = RWKV6Tokenizer(errors="strict")
    with pytest.raises(UnicodeDecodeError):
        strict.detokenize([lone_byte])
    with pytest.raises(ValueError, match="errors="):
        RWKV6Tokenizer(errors="loud")


def test_stream_decoder_holds_back_partial_characters(tokenizer):
    text = "Mixed 中文 and emoji 🎉🧑‍💻 end"
    ids = tokenizer(text)
    stream = tokenizer.stream_decoder()
    pieces = [stream.add(i) for i in ids]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) + stream.flush() == text
    # A stream cut inside a character yields U+FFFD only at the end.
    stream.reset()
    cut = ids[
        : next(
            i
            for i in range(len(ids))
            if tokenizer.detokenize(ids[: i + 1]).endswith("\ufffd")
        )
        + 1
    ]
    out = "".join(stream.add(i) for i in cut)
    assert "\ufffd" not in out
    assert stream.flush() == "\ufffd"


def test_bad_inputs(tokenizer):
    with pytest.raises(ValueError, match="out of range"):
        tokenizer.detokenize([1, -1])
    with pytest.raises(ValueError, match="out of range"):
        tokenizer.detokenize([[65536]])
    with pytest.raises(TypeError, match="expects a str"):
        tokenizer.tokenize(123)
    with pytest.raises(TypeError, match="decode bytes"):
        tokenizer.tokenize(b"bytes")
    with pytest.raises(TypeError, match="expects a str"):
        tokenizer.tokenize(["ok", None])
    with pytest.raises(TypeError, match="integer ids"):
        tokenizer.detokenize(np.array([1.5]))
    with pytest.raises(ValueError, match="lone surrogates"):
        tokenizer.tokenize("bad \ud800 text")


def test_custom_vocabulary_and_assets(tmp_path):
    tokens = [bytes([b]) for b in range(256)] + [b"ab", "中".encode()]
    custom = RWKV6Tokenizer(vocabulary=tokens)
    assert custom("abab") == [257, 257]
    custom.save_assets(str(tmp_path))
    reloaded = RWKV6Tokenizer()
    reloaded.load_assets(str(tmp_path))
    assert reloaded("abab中") == [257, 257, 258]
    with pytest.raises(ValueError, match="256 single bytes"):
        RWKV6Tokenizer(vocabulary=[b"a", b"b"]).tokenize("a")


def test_bad_vocabulary_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("1 'a' 1\n3 'b' 1\n")
    with pytest.raises(ValueError, match="in order"):
        RWKV6Tokenizer(vocabulary=str(path)).tokenize("a")
    path.write_text("1 __import__('os') 1\n")
    with pytest.raises(ValueError, match="not a vocabulary line"):
        RWKV6Tokenizer(vocabulary=str(path)).tokenize("a")


def test_save_to_preset_round_trip(tokenizer, tmp_path):
    # A preset is a backbone config plus assets.
    tiny_backbone().save_to_preset(str(tmp_path))
    tokenizer.save_to_preset(str(tmp_path))
    loaded = RWKV6Tokenizer.from_preset(str(tmp_path))
    text = mixed_corpus(20_000, seed=3)
    assert loaded(text) == tokenizer(text)


def tiny_backbone():
    return RWKV6Backbone(
        vocabulary_size=65536,
        num_layers=1,
        hidden_dim=64,
        intermediate_dim=64,
        mix_lora_dim=4,
        decay_lora_dim=4,
    )


MEMORY_CHILD = """
import random, resource, sys
sys.modules["tensorflow"] = None  # not needed to tokenize
from keras_rwkv.models.rwkv6.rwkv6_tokenizer import RWKV6Tokenizer
tokenizer = RWKV6Tokenizer()
tokenizer._ensure_vocabulary()
rng = random.Random(0)
words = [" the", " world", "日本語", "テスト", "\\n", "123", " example"]
text = "".join(rng.choices(words, k=2_000_000))
size = len(text.encode("utf-8"))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
ids = tokenizer.tokenize(text)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(size, (peak - base) / size)
"""


def test_a_long_string_tokenizes_in_a_small_multiple_of_its_size():
    import os
    import subprocess
    import sys

    env = {**os.environ, "KERAS_BACKEND": "jax"}
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    size, growth = int(out[0]), float(out[1])
    assert size > 10_000_000
    # The text's ids as a list hold 8 bytes a token (~3 bytes of text).
    assert growth <= 6, growth


def test_long_text_windows_give_the_same_ids(monkeypatch):
    from keras_rwkv.models.rwkv6 import rwkv6_encoder

    tokenizer = RWKV6Tokenizer()
    text = "日本語 and English, ünïcödé and digits 0123456789. " * 400
    whole = tokenizer.tokenize(text)
    monkeypatch.setattr(rwkv6_encoder, "ENCODE_CHUNK", 97)
    assert tokenizer.tokenize(text) == whole


def test_windows_cut_exactly_on_mixed_text(monkeypatch, reference):
    # Random code points (astral ones split into byte tokens) and
    # multi-byte characters at every window edge.
    from keras_rwkv.models.rwkv6 import rwkv6_encoder

    text = mixed_corpus(60_000, seed=7)
    monkeypatch.setattr(rwkv6_encoder, "ENCODE_CHUNK", 61)
    assert RWKV6Tokenizer().tokenize(text) == reference.encode(text)


def test_bytes_that_are_not_utf8_match_trie(tokenizer, reference):
    # Only tf.data strings can carry them; BlinkDL's TRIE takes bytes too.
    rng = np.random.default_rng(0)
    for n in (1, 7, 300):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        data += "日本".encode()[:4] + b"\x80abc"
        ids = tokenizer._encoder.encode_bytes(data)
        assert ids == reference.encodeBytes(data)
        assert tokenizer.ids_to_bytes(ids) == data


def test_detokenize_refuses_fractional_ids():
    with pytest.raises(ValueError, match="not an integer"):
        RWKV6Tokenizer().detokenize([1.5])
