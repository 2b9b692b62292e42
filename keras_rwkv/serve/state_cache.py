"""Recurrent states of token prefixes, kept so that no prefix is read
twice.

An RNN's whole context is one fixed-size state: the state after a system
prompt, or after a conversation so far, stands for all of it. The cache
maps a token-id prefix to the state after reading exactly those tokens
(batch 1, on the device); a request starts from the longest cached prefix
of its prompt and reads only the rest. Results do not depend on the cache:
a hit gives the state a cold read of the same ids gives.
"""

import collections
import math
import threading

import keras

_ITEM_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


def state_bytes(state):
    """Bytes an `RWKV6State` holds."""
    return sum(
        math.prod(int(d) for d in x.shape)
        * _ITEM_BYTES[keras.backend.standardize_dtype(x.dtype)]
        for x in (state.wkv, state.shift)
    )


class StateCache:
    """A bounded least-recently-used map of token prefix -> state.

    Args:
        max_bytes: the most state memory kept; the least recently used
            entries go first. 0 turns the cache off.

    Counters (`stats()`): `hits` and `misses` (lookups), `hit_tokens`
    (prompt tokens not read thanks to the cache), `entries`, `bytes`.
    """

    def __init__(self, max_bytes):
        self.max_bytes = int(max_bytes)
        self._entries = collections.OrderedDict()  # tuple(ids) -> state
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.hit_tokens = 0

    def longest_prefix(self, ids):
        """`(n, state)`: the longest cached proper prefix `ids[:n]` (at
        least one token is left to read), or `(0, None)`."""
        ids = tuple(ids)
        best, state = 0, None
        with self._lock:
            for key, value in self._entries.items():
                n = len(key)
                if best < n < len(ids) and ids[:n] == key:
                    best, state = n, value
            if state is None:
                self.misses += 1
                return 0, None
            self._entries.move_to_end(ids[:best])
            self.hits += 1
            self.hit_tokens += best
        return best, state

    def put(self, ids, state):
        """Keeps the state after `ids` (replacing an older one)."""
        if self.max_bytes <= 0 or not ids:
            return
        key = tuple(ids)
        size = state_bytes(state)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
            self._entries[key] = state
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= state_bytes(old)

    def get(self, ids):
        """The state after exactly `ids`, or None (not counted as a
        lookup)."""
        with self._lock:
            state = self._entries.get(tuple(ids))
            if state is not None:
                self._entries.move_to_end(tuple(ids))
            return state

    def stats(self):
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "hit_tokens": self.hit_tokens,
                "entries": len(self._entries),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
            }
