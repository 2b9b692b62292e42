"""The World tokenizer's engine: greedy longest match over the UTF-8
bytes of a text, and the id -> bytes table that decodes.

Matching runs in Rust (`pyrwkv-tokenizer`, Apache-2.0, the fastest exact
World tokenizer on PyPI: ids identical to BlinkDL's TRIE tokenizer on
every input the tests try). Around it:
- a long text (over four `ENCODE_CHUNK`s of characters) goes in windows
  whose ids are re-pointed at shared int objects, so its id list costs 8
  bytes a token, not 36;
- bytes that are not UTF-8 (only `tf.data` strings can be) go through
  `ahocorasick_rs`'s leftmost-longest matcher, which is exactly greedy
  longest match because every single byte is a token; it is built on
  first need;
- decoding gathers each id's bytes with numpy (ids checked there too):
  where every token of the call has at most 16 bytes (all but 221 of the
  vocabulary), as fixed-width rows then compacted, else from one flat
  table; an integer array is used as it is.
"""

import array as pyarray
import operator
import os
import tempfile

import numpy as np
import pyrwkv_tokenizer

from keras_rwkv.models.rwkv6.rwkv6_vocabulary import vocabulary_line

# Token ids the model can emit: 0 .. 65535 (65530.. have no token).
MAX_TOKEN_ID = 65535
# Encoding returns these int objects, one per id, so that a long text's
# list of ids holds pointers only.
_IDS = list(range(MAX_TOKEN_ID + 2))
ENCODE_CHUNK = 1 << 20  # characters matched at a time in a long text


class WorldEncoder:
    """Encodes text to ids and ids to bytes for one vocabulary.

    Args:
        tokens: the tokens as bytes, id `i` at index `i - 1`; all 256
            single bytes among them.
        path: the vocabulary file they were read from (it is handed to the
            Rust matcher as it is), or None to write one for it.
    """

    def __init__(self, tokens, path=None):
        self.tokens = tokens
        self.max_bytes = max(len(t) for t in tokens)
        table = [b""] + list(tokens)
        self.id_to_bytes = table + [b""] * (MAX_TOKEN_ID + 1 - len(table))
        self.id_to_length = [len(t) for t in self.id_to_bytes]
        # The tokens end to end, and where each starts: decoding gathers
        # from here with numpy.
        self._flat = np.frombuffer(b"".join(self.id_to_bytes), np.uint8)
        self._lengths = np.array(self.id_to_length, np.int32)
        # int32 (the table is small): int64 starts make decoding 1.7x
        # slower, in the scatter of their differences into int32 steps.
        self._offsets = (np.cumsum(self._lengths) - self._lengths).astype(
            np.int32
        )
        # Every token of up to 8 (or 16) bytes as one fixed-width row, and
        # which of its bytes are real: decoding ids whose tokens all fit is
        # two row gathers and one compaction, ~2x quicker than the general
        # gather below.
        self._rows = {w: _fixed_width(self, w) for w in (8, 16)}
        self._rust = _rust_matcher(tokens, path)
        self._bytes_matcher = None

    def encode(self, text):
        """Ids of a `str` (valid UTF-8: no lone surrogates)."""
        # Up to four chunks in one call (a list of at most ~60 MB); longer
        # texts in windows whose ids share int objects (8 bytes a token).
        if len(text) <= 4 * ENCODE_CHUNK:
            return self._rust.encode(text)
        return self._encode_long(text)

    def encode_batch(self, texts):
        """Ids of each `str` of a list, in one call where none is long."""
        if not texts:
            return []
        if max(map(len, texts)) <= 4 * ENCODE_CHUNK:
            return self._rust.encode_batch(texts)
        return [self.encode(text) for text in texts]

    def _encode_long(self, text):
        # Greedy longest match from a token boundary depends only on the
        # next `max_bytes` bytes, so the tokens of a window that start at
        # least that far from its end are the text's own. The next window
        # starts at the last of their ends that is a character boundary
        # (found walking back from the window's end: a few dozen tokens).
        ids, start, lengths = [], 0, self.id_to_length
        while True:
            window = text[start : start + ENCODE_CHUNK + self.max_bytes]
            found = self._rust.encode(window)
            if start + len(window) >= len(text):
                return _extend_shared(ids, found)
            raw = window.encode("utf-8")
            end, safe_end = len(raw), len(raw) - self.max_bytes
            for k in range(len(found) - 1, -1, -1):
                begin = end - lengths[found[k]]
                # `end` is the window's end, or the next byte is not
                # 0b10xxxxxx: a character starts there.
                boundary = end == len(raw) or raw[end] & 0xC0 != 0x80
                if begin <= safe_end and boundary:
                    break
                end = begin
            else:  # a window too short to cut: encode the text whole
                return _extend_shared([], self._rust.encode(text))
            _extend_shared(ids, found[: k + 1])
            start += len(raw[:end].decode("utf-8"))

    def encode_bytes(self, data):
        """Ids of raw bytes, UTF-8 or not."""
        try:
            return self.encode(data.decode("utf-8"))
        except UnicodeDecodeError:
            pass
        if self._bytes_matcher is None:
            import ahocorasick_rs

            self._bytes_matcher = ahocorasick_rs.BytesAhoCorasick(
                self.tokens,
                matchkind=ahocorasick_rs.MatchKind.LeftmostLongest,
            )
        return [
            _IDS[i + 1]
            for i, _, _ in self._bytes_matcher.find_matches_as_indexes(data)
        ]

    def decode(self, ids):
        """The bytes of a flat sequence of ids, a list or an integer array
        (0 and ids without a token give nothing). Raises `ValueError` for
        ids outside 0..65535 or not whole numbers, `TypeError` for what is
        not a number."""
        array = _id_array(ids)
        if array.size == 0:
            return b""
        lengths = self._lengths[array]
        longest = lengths.max()
        for width, (rows, real) in self._rows.items():
            if longest <= width:
                data = np.take(rows, array).view(np.uint8)
                return data[np.take(real, array).view(np.bool_)].tobytes()
        if not lengths.all():  # drop ids that give nothing
            given = lengths > 0
            array, lengths = array[given], lengths[given]
        if array.size == 0:
            return b""
        ends = np.cumsum(lengths, dtype=np.intp)
        # Every output byte's place in the flat table: one more than the
        # byte before within a token, a jump where a token starts. The
        # steps are ones with the jumps scattered in, then summed (into
        # intp: numpy would convert any other index type first).
        step = np.ones(int(ends[-1]), np.int32)
        starts = self._offsets[array]
        step[0] = starts[0]
        jumps = starts[1:] - starts[:-1]
        jumps -= lengths[:-1]
        jumps += 1
        step[ends[:-1]] = jumps
        place = np.cumsum(step, dtype=np.intp)
        return self._flat[place].tobytes()


def _fixed_width(encoder, width):
    """`(rows, real)`: each id's token in `width` bytes (cut where longer)
    and which of them are the token's, both as numpy `V{width}` items, so
    that a gather copies whole rows."""
    lengths = encoder._lengths[:, None]
    real = np.arange(width, dtype=np.int32)[None, :] < lengths
    places = encoder._offsets[:, None] + np.arange(width, dtype=np.int32)
    rows = np.zeros(real.shape, np.uint8)
    rows[real] = encoder._flat[places[real]]
    kind = f"V{width}"
    return rows.view(kind).reshape(-1), real.view(kind).reshape(-1)


def _id_array(ids):
    """`ids` (a flat list, tuple or integer array) as an int64 array,
    every id checked."""
    if isinstance(ids, np.ndarray) and ids.ndim > 1:
        raise ValueError(
            f"Expected a flat sequence of ids; got an array of shape "
            f"{ids.shape} (decode its rows one by one)."
        )
    if isinstance(ids, np.ndarray) and ids.dtype.kind in "iub":
        array = ids.reshape(-1)
    else:
        try:  # ints only (numpy's too): floats and the rest raise
            array = np.frombuffer(pyarray.array("q", ids), np.int64)
        except (TypeError, OverflowError):
            # Whole floats pass, anything else raises, naming the id.
            array = np.array([check_id(i) for i in ids], np.int64)
    if array.size and (array.min() < 0 or array.max() > MAX_TOKEN_ID):
        for i in array.tolist():
            check_id(i)  # raises, naming the id
    return array.astype(np.int64, copy=False)


def check_id(value):
    """`value` as an int id, or an error saying why it is not one."""
    if not isinstance(value, int):
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"Token id {value} is not an integer.")
        try:
            value = int(value)
        except (TypeError, ValueError):
            raise TypeError(
                f"detokenize expects integer ids; got {type(value).__name__}."
            ) from None
    if not 0 <= value <= MAX_TOKEN_ID:
        raise ValueError(
            f"Token id {value} is out of range: RWKV World ids are "
            f"0..{MAX_TOKEN_ID}."
        )
    return value


def _extend_shared(ids, found):
    """`ids` extended by `found` re-pointed at the shared int objects."""
    if len(found) > 1:
        ids += operator.itemgetter(*found)(_IDS)
    else:
        ids += [_IDS[i] for i in found]
    return ids


def _rust_matcher(tokens, path):
    if path is not None:
        return pyrwkv_tokenizer.WorldTokenizer(os.fspath(path))
    fd, tmp = tempfile.mkstemp(suffix=".txt")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(
                vocabulary_line(i + 1, t) for i, t in enumerate(tokens)
            )
        return pyrwkv_tokenizer.WorldTokenizer(tmp)
    finally:
        os.remove(tmp)
