import codecs


class RWKV6StreamDecoder:
    """Turns ids arriving one at a time into text, never splitting a
    character.

    A World token can end in the middle of a multi-byte UTF-8 character
    (many CJK characters and emoji span two or three tokens). Decoding each
    token alone would print U+FFFD; this decoder keeps the unfinished bytes
    until the character is complete.

    Args:
        tokenizer: an `RWKV6Tokenizer`.
        errors: treatment of bytes that can never form valid UTF-8;
            defaults to the tokenizer's `errors` (`"replace"`).

    Examples:
    ```python
    stream = tokenizer.stream_decoder()
    for token_id in generated_ids:
        print(stream.add(token_id), end="", flush=True)
    print(stream.flush())
    ```
    """

    def __init__(self, tokenizer, errors=None):
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(
            errors or tokenizer.errors
        )

    def add(self, ids):
        """Feeds one id or a sequence of ids; returns the text completed by
        them (possibly empty)."""
        if isinstance(ids, int) or not hasattr(ids, "__iter__"):
            ids = [ids]
        return self._decoder.decode(self.tokenizer.ids_to_bytes(ids))

    def flush(self):
        """Ends the stream: returns what is held back (an unfinished
        character becomes U+FFFD under `errors="replace"`)."""
        return self._decoder.decode(b"", final=True)

    def reset(self):
        """Drops anything held back."""
        self._decoder.reset()
