"""Tokenizer speed: ours vs pyrwkv-tokenizer (the fastest peer, Rust),
BlinkDL's TRIE_TOKENIZER (the anchor) and KerasHub's RWKVTokenizer; same
text, same run, one thread unless said.

Rows: encode of one 4 MB string, of 10,000 short lines (one call with the
list), of a 12 MB string (windowed, shared int objects), and decode of a
list and of an int32 array.
Ids are checked identical to TRIE's before anything is timed.

    pip install pyrwkv-tokenizer   # the peer, if not installed
    python benchmarks/tokenizer_speed.py
"""

import datetime
import os
import platform
import random
import statistics
import time

import numpy as np

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


def rates(fns, data, n_bytes, repeats=9):
    """MB/s of each function: the median of `repeats` runs, the functions
    taking turns (this machine's speed drifts; turns keep it fair)."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(data)
            times[name].append(time.perf_counter() - t0)
    return {
        name: n_bytes / statistics.median(t) / 1e6 for name, t in times.items()
    }


def main():
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    from keras_rwkv import RWKV6Tokenizer
    from keras_rwkv.models.rwkv6.rwkv6_tokenizer import BUNDLED_VOCAB

    t0 = time.perf_counter()
    ours = RWKV6Tokenizer()
    ours.vocabulary_size()  # parse the vocabulary, build the matcher
    load_s = time.perf_counter() - t0
    trie = TRIE_TOKENIZER(BUNDLED_VOCAB)
    try:
        import pyrwkv_tokenizer

        peer = pyrwkv_tokenizer.RWKVTokenizer()
    except ImportError:
        peer = None

    text = corpus(4_000_000)
    big = corpus(12_000_000, seed=2)
    lines = [line for line in corpus(2_000_000, seed=1).split("\n") if line]
    lines = lines[:10_000]
    n_text, n_big = len(text.encode()), len(big.encode())
    n_lines = sum(len(s.encode()) for s in lines)
    ids = trie.encode(text)
    assert ours.tokenize(text) == ids
    assert ours.tokenize(big) == trie.encode(big)
    assert ours.tokenize(lines) == [trie.encode(s) for s in lines]
    if peer is not None:
        assert peer.encode(text) == ids

    def table(name, rows):
        print(f"\n{name}")
        print("| tokenizer | MB/s | vs TRIE (anchor) | vs pyrwkv-tokenizer |")
        print("|---|---|---|---|")
        anchor = rows["BlinkDL TRIE_TOKENIZER"]
        fastest_peer = rows.get("pyrwkv-tokenizer 0.9.1")
        for label, mbs in rows.items():
            vs_peer = f"{mbs / fastest_peer:.2f}x" if fastest_peer else "-"
            print(f"| {label} | {mbs:.1f} | {mbs / anchor:.2f}x | {vs_peer} |")

    def rows_for(ours_fn, trie_fn, peer_fn, data, n):
        rows = {
            "BlinkDL TRIE_TOKENIZER": rates({"t": trie_fn}, data, n, 1)["t"]
        }
        fns = {"keras_rwkv RWKV6Tokenizer": ours_fn}
        if peer is not None:
            fns["pyrwkv-tokenizer 0.9.1"] = peer_fn
        measured = rates(fns, data, n)
        rows.update(sorted(measured.items(), reverse=True))
        return rows

    peer_encode = peer and peer.encode
    peer_batch = peer and peer.encode_batch
    peer_decode = peer and peer.decode
    print(
        f"# {datetime.date.today()} {platform.machine()} "
        f"({os.cpu_count()} cores), one thread; mixed English/Chinese/"
        f"Japanese/code/emoji; medians of 9 runs taking turns (TRIE: one "
        f"run); our vocabulary load {load_s:.2f} s"
    )
    table(
        "encode, one 4 MB string",
        rows_for(
            ours.tokenize, trie.encode, peer and peer.encode, text, n_text
        ),
    )
    table(
        f"encode, {len(lines)} short lines (one call with the list)",
        rows_for(
            ours.tokenize,
            lambda batch: [trie.encode(s) for s in batch],
            peer_batch,
            lines,
            n_lines,
        ),
    )
    table(
        "encode, one 12 MB string",
        rows_for(ours.tokenize, trie.encode, peer_encode, big, n_big),
    )
    table(
        "decode 4 MB of ids, a list",
        rows_for(ours.detokenize, trie.decode, peer_decode, ids, n_text),
    )
    # What `generate` returns: an int32 array (the others need a list).
    id_array = np.array(ids, "int32")
    assert ours.detokenize(id_array) == text
    table(
        "decode 4 MB of ids, an int32 array",
        rows_for(
            ours.detokenize,
            lambda a: trie.decode(a.tolist()),
            peer and (lambda a: peer.decode(a.tolist())),
            id_array,
            n_text,
        ),
    )
    try:
        from keras_hub.tokenizers import RWKVTokenizer

        with open(BUNDLED_VOCAB, encoding="utf-8") as f:
            kh = RWKVTokenizer(vocabulary=f.readlines())
        small = corpus(200_000, seed=1)
        mbs = rates({"kh": kh.tokenize}, small, len(small.encode()), 1)["kh"]
        print(f"\nKerasHub RWKVTokenizer 0.32, 200 kB string: {mbs:.2f} MB/s")
    except Exception as e:  # pragma: no cover - optional anchor
        print(f"KerasHub RWKVTokenizer skipped: {e}")


if __name__ == "__main__":
    main()
