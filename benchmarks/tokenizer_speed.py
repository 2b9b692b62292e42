"""Tokenizer encode speed: ours vs BlinkDL's TRIE_TOKENIZER (anchor) and
KerasHub's RWKVTokenizer, same text, same run, one core.

    python benchmarks/tokenizer_speed.py
"""

import datetime
import os
import platform
import random
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

SNIPPETS = [
    "The quick brown fox jumps over the lazy dog. It was a sunny day.\n",
    "我们今天去公园散步，天气非常好。人工智能正在改变世界。\n",
    "日本語のテキスト：カタカナ、ひらがな、漢字。東京タワー！\n",
    "def foo(x: int) -> int:\n    return x * 2  # double it\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }\n",
    '{"key": [1, 2.5, null], "nested": {"a": "b"}}\n',
    "    \n\t\n",
    "😀🎉🚀 emoji and Ünïcödé text. ",
]


def corpus(n_bytes, seed=0):
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_bytes:
        s = rng.choice(SNIPPETS)
        parts.append(s)
        size += len(s.encode("utf-8"))
    return "".join(parts)


def rate(fn, text, repeats=3):
    n = len(text.encode("utf-8"))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(text)
        best = min(best, time.perf_counter() - t0)
    return n / best / 1e6


def main():
    from keras_rwkv import RWKV6Tokenizer
    from keras_rwkv.models.rwkv6.rwkv6_tokenizer import BUNDLED_VOCAB

    t0 = time.perf_counter()
    ours = RWKV6Tokenizer()
    ours.vocabulary_size()  # parse the vocabulary, build the matcher
    load_s = time.perf_counter() - t0

    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    trie = TRIE_TOKENIZER(BUNDLED_VOCAB)
    text = corpus(4_000_000)
    assert ours.tokenize(text) == trie.encode(text)

    rows = [
        ("BlinkDL TRIE_TOKENIZER (anchor)", rate(trie.encode, text)),
        ("keras_rwkv RWKV6Tokenizer", rate(ours.tokenize, text)),
    ]
    try:
        from keras_hub.tokenizers import RWKVTokenizer

        with open(BUNDLED_VOCAB, encoding="utf-8") as f:
            kh = RWKVTokenizer(vocabulary=f.readlines())
        small = corpus(200_000, seed=1)
        rows.append(
            ("KerasHub RWKVTokenizer (200 kB)", rate(kh.tokenize, small, 1))
        )
    except Exception as e:  # pragma: no cover - optional anchor
        print(f"KerasHub RWKVTokenizer skipped: {e}")

    anchor = rows[0][1]
    print(
        f"# {datetime.date.today()} {platform.machine()}, one thread, "
        f"4 MB mixed English/Chinese/Japanese/code/emoji; "
        f"our vocabulary load {load_s:.2f} s"
    )
    print("| tokenizer | MB/s | vs anchor |")
    print("|---|---|---|")
    for name, mbs in rows:
        print(f"| {name} | {mbs:.2f} | {mbs / anchor:.2f}x |")


if __name__ == "__main__":
    main()
