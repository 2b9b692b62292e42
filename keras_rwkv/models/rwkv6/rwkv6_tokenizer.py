import itertools
import os
import types

import keras
import numpy as np
from keras_hub.tokenizers import Tokenizer

from keras_rwkv.models.rwkv6.rwkv6_backbone import RWKV6Backbone
from keras_rwkv.models.rwkv6.rwkv6_encoder import WorldEncoder
from keras_rwkv.models.rwkv6.rwkv6_encoder import check_id
from keras_rwkv.models.rwkv6.rwkv6_vocabulary import load_vocabulary_file
from keras_rwkv.models.rwkv6.rwkv6_vocabulary import vocabulary_line

VOCAB_FILENAME = "rwkv_vocab_v20230424.txt"
BUNDLED_VOCAB = os.path.join(os.path.dirname(__file__), VOCAB_FILENAME)
ERRORS = ("replace", "strict", "ignore", "backslashreplace")


@keras.saving.register_keras_serializable(package="keras_rwkv")
class RWKV6Tokenizer(Tokenizer):
    """The RWKV World tokenizer (`rwkv_vocab_v20230424`).

    Greedy longest match over the UTF-8 bytes of the text, against 65,529
    byte-string tokens (ids 1..65529). Id 0 is padding and end of text
    (`pad_token_id == end_token_id == 0`); there is no start token. Ids
    65530..65535 exist in the model's output layer but have no token and
    decode to nothing, like 0.

    `RWKV6Tokenizer()` uses the vocabulary shipped with the package
    (from BlinkDL's `rwkv` package, Apache-2.0). Matching runs in Rust
    (`pyrwkv-tokenizer`; see `rwkv6_encoder.py`), exactly as BlinkDL's
    TRIE tokenizer matches.

    Tokens (`id_to_token`, `get_vocabulary`) are as in the vocabulary file:
    `str` when the token is valid UTF-8, `bytes` otherwise (a piece of a
    multi-byte character). `token_to_id` accepts either.

    Args:
        vocabulary: `None` (the bundled World vocabulary), a path to a
            vocabulary file, or a list of tokens (str or bytes), the first
            having id 1.
        errors: how `detokenize` treats ids that do not form valid UTF-8
            (e.g. generation stopped inside a character): `"replace"`
            (U+FFFD, the default), `"ignore"`, `"backslashreplace"` or
            `"strict"` (raise `UnicodeDecodeError`).

    Examples:
    ```python
    tokenizer = keras_rwkv.RWKV6Tokenizer()
    tokenizer("Hello world")        # [33155, 1940]... (a list of ids)
    tokenizer(["a", "bc"])          # a list of lists
    tokenizer.detokenize([33155])   # "Hello"
    stream = tokenizer.stream_decoder()
    text = "".join(stream.add(i) for i in ids) + stream.flush()
    ```
    """

    backbone_cls = RWKV6Backbone

    def __init__(self, vocabulary=None, errors="replace", **kwargs):
        kwargs.setdefault("dtype", "int32")
        super().__init__(**kwargs)
        if errors not in ERRORS:
            raise ValueError(
                f"errors={errors!r}; use one of {', '.join(ERRORS)}."
            )
        self.errors = errors
        self.file_assets = [VOCAB_FILENAME]
        self.pad_token_id = 0
        self.end_token_id = 0
        self.start_token_id = None
        self.set_vocabulary(vocabulary)

    # --- vocabulary -------------------------------------------------------

    def set_vocabulary(self, vocabulary):
        """Sets the vocabulary (see the class `Args`); parsed lazily."""
        if vocabulary is not None and not isinstance(
            vocabulary, (str, os.PathLike, list, tuple)
        ):
            raise TypeError(
                "vocabulary must be None, a path or a list of tokens; got "
                f"{type(vocabulary).__name__}."
            )
        self._vocabulary_source = vocabulary
        self._parsed = None

    # The parsed vocabulary lives in one plain object: as layer attributes,
    # Keras would track its 65k-entry lists and dict element by element
    # (about a second at every model load).
    @property
    def _tokens(self):
        return self._parsed.tokens

    @property
    def _token_to_id(self):
        return self._parsed.token_to_id

    @property
    def _encoder(self):
        return self._parsed.encoder

    def _ensure_vocabulary(self):
        if self._parsed is not None:
            return
        source = self._vocabulary_source
        if source is None:
            source = BUNDLED_VOCAB
        path = None
        if isinstance(source, (str, os.PathLike)):
            tokens = load_vocabulary_file(source)
            path = source  # checked: the Rust matcher may read it as it is
        else:
            tokens = [
                t.encode("utf-8") if isinstance(t, str) else bytes(t)
                for t in source
            ]
        missing = {bytes([b]) for b in range(256)} - set(tokens)
        if missing:
            raise ValueError(
                "An RWKV vocabulary must contain all 256 single bytes so "
                f"that any text can be encoded; {len(missing)} are missing."
            )
        self._parsed = types.SimpleNamespace(
            tokens=tokens,
            token_to_id={t: i + 1 for i, t in enumerate(tokens)},
            encoder=WorldEncoder(tokens, path),
        )

    def save_assets(self, dir_path):
        self._ensure_vocabulary()
        path = os.path.join(dir_path, VOCAB_FILENAME)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(
                vocabulary_line(i + 1, t) for i, t in enumerate(self._tokens)
            )

    def load_assets(self, dir_path=""):
        self.set_vocabulary(os.path.join(dir_path, VOCAB_FILENAME))

    def vocabulary_size(self):
        """Number of ids with a meaning: 0 (pad/end) and the tokens."""
        self._ensure_vocabulary()
        return len(self._tokens) + 1

    def get_vocabulary(self):
        """All tokens in id order, starting with id 1 (see `id_to_token`)."""
        self._ensure_vocabulary()
        return [_as_text(t) for t in self._tokens]

    def id_to_token(self, id):
        self._ensure_vocabulary()
        id = check_id(id)
        if not 1 <= id <= len(self._tokens):
            raise ValueError(
                f"Id {id} has no token (0 is pad/end; tokens are 1.."
                f"{len(self._tokens)})."
            )
        return _as_text(self._tokens[id - 1])

    def token_to_id(self, token):
        self._ensure_vocabulary()
        key = token.encode("utf-8") if isinstance(token, str) else token
        if key not in self._token_to_id:
            raise KeyError(f"{token!r} is not a token of this vocabulary.")
        return self._token_to_id[key]

    @property
    def special_token_ids(self):
        return [0]

    @property
    def special_tokens(self):
        return []

    # --- encoding ---------------------------------------------------------

    def _encode(self, texts, batched):
        """The Rust matcher checks types and UTF-8 itself (no copy here);
        what it refuses is said again with what to do."""
        encoder = self._encoder
        try:
            if batched:
                return encoder.encode_batch(texts)
            return encoder.encode(texts)
        except (TypeError, UnicodeEncodeError):
            for text in texts if batched else [texts]:
                _check_text(text)
            raise

    def tokenize(self, inputs):
        """Text to ids: a str gives a list of ids, a list (or 1-D array) of
        str a list of lists. Inside `tf.data`, string tensors give
        (ragged) int32 tensors."""
        self._ensure_vocabulary()
        if self._use_tf_workflow():
            return self._tokenize_tf(inputs)
        if isinstance(inputs, np.ndarray):
            if inputs.ndim == 0:
                return self._encode(inputs.item(), batched=False)
            if inputs.ndim != 1:
                raise ValueError(
                    f"tokenize takes a str or a 1-D batch; got shape "
                    f"{inputs.shape}."
                )
            inputs = inputs.tolist()
        elif _is_tf_tensor(inputs):
            inputs = _tf_strings_to_python(inputs)
        batched = isinstance(inputs, (list, tuple))
        return self._encode(inputs, batched)

    def _tokenize_tf(self, inputs):
        import tensorflow as tf

        inputs = tf.convert_to_tensor(inputs)
        scalar = inputs.shape.rank == 0

        def encode(strings):
            encode = self._encoder.encode_bytes
            seqs = [encode(s) for s in strings.numpy()]
            flat = np.fromiter(itertools.chain.from_iterable(seqs), np.int32)
            return flat, np.array([len(s) for s in seqs], np.int64)

        flat, lengths = tf.py_function(
            encode, [tf.reshape(inputs, [-1])], [tf.int32, tf.int64]
        )
        flat.set_shape([None])
        lengths.set_shape([None])
        ragged = tf.RaggedTensor.from_row_lengths(flat, lengths)
        return ragged[0] if scalar else ragged

    # --- decoding ---------------------------------------------------------

    def ids_to_bytes(self, ids):
        """The raw bytes of a flat sequence of ids (0 and ids without a
        token give nothing)."""
        self._ensure_vocabulary()
        return self._encoder.decode(ids)

    def detokenize(self, inputs):
        """Ids to text: a flat sequence (or a single id) gives a str, a
        batch (list of lists, 2-D array, ragged tensor) a list of str.

        Bytes that do not form valid UTF-8 (for instance a sequence that
        stops inside a character) are handled by `errors` (U+FFFD by
        default). Ids outside 0..65535 raise `ValueError`.
        """
        self._ensure_vocabulary()
        if self._use_tf_workflow():
            return self._detokenize_tf(inputs)
        batch, batched = _canonicalize_ids(inputs)
        texts = [
            self.ids_to_bytes(seq).decode("utf-8", self.errors) for seq in batch
        ]
        return texts if batched else texts[0]

    def _detokenize_tf(self, inputs):
        import tensorflow as tf

        if not isinstance(inputs, tf.RaggedTensor):
            inputs = tf.convert_to_tensor(inputs)
        scalar = inputs.shape.rank == 1
        if scalar:
            inputs = inputs[None]
        if isinstance(inputs, tf.RaggedTensor):
            flat, lengths = inputs.flat_values, inputs.row_lengths()
        else:
            flat = tf.reshape(inputs, [-1])
            lengths = tf.fill([tf.shape(inputs)[0]], tf.shape(inputs)[1])

        def decode(flat, lengths):
            flat, out, start = flat.numpy(), [], 0
            for n in lengths.numpy().tolist():
                data = self.ids_to_bytes(flat[start : start + n])
                out.append(data.decode("utf-8", self.errors).encode("utf-8"))
                start += n
            return np.array(out, dtype=object)

        texts = tf.py_function(decode, [flat, lengths], tf.string)
        texts.set_shape([None])
        return texts[0] if scalar else texts

    def stream_decoder(self):
        """A decoder for ids arriving one by one (streaming generation):
        it holds back bytes of an unfinished character. See
        `RWKV6StreamDecoder`."""
        from keras_rwkv.models.rwkv6.rwkv6_stream_decoder import (
            RWKV6StreamDecoder,
        )

        return RWKV6StreamDecoder(self)

    def compute_output_spec(self, input_spec):
        return keras.KerasTensor(
            input_spec.shape + (None,), dtype=self.compute_dtype
        )

    def get_config(self):
        # The vocabulary travels as a preset asset, not in the config.
        config = super().get_config()
        config["errors"] = self.errors
        return config


def _as_text(token):
    try:
        return token.decode("utf-8")
    except UnicodeDecodeError:
        return token


def _check_text(text):
    """Raises what is wrong with a text the matcher refused."""
    if not isinstance(text, str):
        raise TypeError(
            "RWKV6Tokenizer.tokenize expects a str or a list of str; got "
            f"{type(text).__name__}"
            + (
                " (decode bytes to str first)"
                if isinstance(text, bytes)
                else ""
            )
            + "."
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            "Text contains characters that cannot be encoded as UTF-8 "
            f"(lone surrogates at {e.start}); clean it first, e.g. "
            "text.encode('utf-8', 'replace').decode('utf-8')."
        ) from None


def _is_tf_tensor(x):
    return type(x).__module__.startswith("tensorflow")


def _tf_strings_to_python(x):
    values = x.numpy()
    if isinstance(values, bytes):
        return values.decode("utf-8")
    return [v.decode("utf-8") for v in values.reshape(-1)]


def _canonicalize_ids(inputs):
    """-> (list of id sequences, batched?)"""
    if _is_tf_tensor(inputs):
        inputs = (
            inputs.to_list() if hasattr(inputs, "to_list") else (inputs.numpy())
        )
    elif keras.ops.is_tensor(inputs):
        inputs = keras.ops.convert_to_numpy(inputs)
    if isinstance(inputs, np.ndarray):
        if inputs.ndim > 2:
            raise ValueError(
                f"detokenize takes ids of rank 0, 1 or 2; got {inputs.shape}."
            )
        if inputs.dtype.kind not in "iu":
            raise TypeError(
                f"detokenize expects integer ids; got dtype {inputs.dtype}."
            )
        # Arrays stay arrays: the decoder gathers from them as they are.
        if inputs.ndim == 2:
            return list(inputs), True
        return [inputs.reshape(-1)], False
    if isinstance(inputs, (int, np.integer)):
        return [[inputs]], False
    if isinstance(inputs, (list, tuple)):
        if inputs and isinstance(inputs[0], (list, tuple, np.ndarray)):
            return list(inputs), True
        return [inputs], False
    raise TypeError(
        "detokenize expects an id, a sequence of ids or a batch of them; "
        f"got {type(inputs).__name__}."
    )
