"""Read `.safetensors` files into memory-mapped numpy arrays.

The format is data only (an 8-byte header length, a JSON header naming
each tensor's dtype, shape and byte range, then the raw little-endian
bytes), so reading it can never run code. It is simple enough to read
directly: no `safetensors` package is needed, and bfloat16 comes through
`ml_dtypes` (which numpy lacks).
"""

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from keras_rwkv.convert.torch_checkpoint import CheckpointError

_DTYPES = {
    "BOOL": np.bool_,
    "U8": np.uint8,
    "I8": np.int8,
    "U16": np.uint16,
    "I16": np.int16,
    "U32": np.uint32,
    "I32": np.int32,
    "U64": np.uint64,
    "I64": np.int64,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F32": np.float32,
    "F64": np.float64,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}
# The format's own limit on the header (100 MB).
MAX_HEADER_BYTES = 100_000_000


def _damaged(path, why):
    return CheckpointError(
        f"{path} is not a readable safetensors file ({why}). If it was "
        "downloaded, download it again."
    )


def read_header(path):
    """The JSON header of a safetensors file (tensor name -> `dtype`,
    `shape`, `data_offsets`; `__metadata__` dropped) and the offset of its
    byte buffer."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _damaged(path, "shorter than its 8-byte header length")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise _damaged(path, f"header length {length} is impossible")
            raw = f.read(length)
    except FileNotFoundError:
        raise CheckpointError(f"No such file: {path}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _damaged(path, f"its header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise _damaged(path, "its header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + length, size


def load_safetensors(path):
    """Every tensor of a safetensors file, as read-only numpy arrays
    memory-mapped from the file (nothing is read until used).

    Raises:
        CheckpointError: the file is missing, truncated, or its header
            names an unknown dtype or a byte range that does not fit.
    """
    path = os.fspath(path)
    header, start, size = read_header(path)
    buffer_size = size - start
    arrays = {}
    for name, entry in header.items():
        if isinstance(entry, dict) and entry.get("dtype") not in _DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {entry.get('dtype')!r}, "
                f"which keras-rwkv does not read ({', '.join(_DTYPES)})."
            )
        try:
            dtype = np.dtype(_DTYPES[entry["dtype"]])
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _damaged(
                path, f"tensor {name!r} has a malformed entry {entry!r}"
            ) from None
        nbytes = math.prod(shape) * dtype.itemsize
        if not 0 <= begin <= end <= buffer_size or end - begin != nbytes:
            raise _damaged(
                path,
                f"tensor {name!r} ({entry['dtype']} {list(shape)}) claims "
                f"bytes {begin}..{end} of {buffer_size}; the file is "
                "truncated or damaged",
            )
        if nbytes == 0:
            arrays[name] = np.zeros(shape, dtype)
            continue
        arrays[name] = np.memmap(
            path, dtype=dtype, mode="r", offset=start + begin, shape=shape
        )
    return arrays
