"""Write `.pth` files that `torch.load` reads, without PyTorch.

The format `torch.save` writes (and `torch_checkpoint.py` reads): a zip
archive, stored uncompressed, holding `data.pkl` (a pickle of the state
dict in which each tensor is `torch._utils._rebuild_tensor_v2` of a
storage named by a persistent id), one raw little-endian buffer per
storage under `data/`, and `version`/`byteorder` records. The pickle is
written opcode by opcode (there are only a dict, strings, ints, tuples
and those two kinds of global in it), and each buffer starts on a 64-byte
boundary as torch's own writer does, so `torch.load(..., mmap=True)`
works too. The file is written beside its target and renamed into place.
"""

import os
import struct
import tempfile
import zipfile

import numpy as np

from keras_rwkv.convert.torch_checkpoint import _STORAGE_DTYPES

_STORAGE_NAMES = {np.dtype(v): k for k, v in _STORAGE_DTYPES.items()}
ALIGNMENT = 64
ARCHIVE = "archive"
CHUNK = 1 << 26  # bytes written at a time


class _Pickle:
    """The few pickle opcodes (protocol 2) a state dict of tensors needs."""

    def __init__(self):
        self.out = bytearray(b"\x80\x02")  # PROTO 2

    def global_(self, module, name):
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"

    def string(self, text):
        data = text.encode("utf-8")
        self.out += b"X" + struct.pack("<I", len(data)) + data

    def integer(self, value):
        if -(2**31) <= value < 2**31:
            self.out += b"J" + struct.pack("<i", value)
        else:  # LONG1: little-endian two's complement
            data = value.to_bytes((value.bit_length() + 8) // 8, "little")
            self.out += b"\x8a" + bytes([len(data)]) + data

    def ints(self, values):
        self.out += b"("  # MARK
        for v in values:
            self.integer(int(v))
        self.out += b"t"  # TUPLE

    def tensor(self, storage_name, key, array):
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.out += b"("  # MARK: the arguments
        # Persistent id ('storage', type, key, location, numel).
        self.out += b"("
        self.string("storage")
        self.global_("torch", storage_name)
        self.string(key)
        self.string("cpu")
        self.integer(int(array.size))
        self.out += b"tQ"  # TUPLE, BINPERSID
        self.integer(0)  # storage offset
        self.ints(array.shape)
        strides = np.cumprod((1,) + array.shape[::-1])[:-1][::-1]
        self.ints(strides)
        self.out += b"\x89"  # NEWFALSE: requires_grad
        self.global_("collections", "OrderedDict")  # backward hooks
        self.out += b")R"  # EMPTY_TUPLE, REDUCE
        self.out += b"tR"  # TUPLE, REDUCE

    def state_dict(self, arrays):
        self.out += b"}("  # EMPTY_DICT, MARK
        for key, (name, array) in enumerate(arrays.items()):
            self.string(name)
            self.tensor(_STORAGE_NAMES[array.dtype], str(key), array)
        self.out += b"u."  # SETITEMS, STOP
        return bytes(self.out)


def _aligned_entry(zf, name, size):
    """A stored `ZipInfo` whose data will start on an `ALIGNMENT`
    boundary (padding in an extra field, as torch does)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT  # as zipfile decides
    header = 30 + len(name.encode()) + 4 + (20 if zip64 else 0)
    pad = -(zf.fp.tell() + header) % ALIGNMENT
    info.extra = struct.pack("<HH", 0x4246, pad) + b"\0" * pad  # "FB"
    return info


def _write(zf, name, data):
    """Writes `data` (bytes or a C-contiguous array) as an aligned
    stored entry, in chunks."""
    if isinstance(data, np.ndarray):
        data = data.reshape(-1).view(np.uint8)  # bfloat16 too
    view = memoryview(data)
    with zf.open(_aligned_entry(zf, name, view.nbytes), "w") as f:
        for start in range(0, view.nbytes, CHUNK):
            f.write(view[start : start + CHUNK])


def save_torch_checkpoint(arrays, path):
    """Writes a dict of name -> numpy array as a `torch.save` checkpoint.

    Args:
        arrays: name -> array (float64/32/16, bfloat16, int64/32/16/8,
            uint8 or bool).
        path: the `.pth` to write; replaced atomically.

    Returns:
        The path.
    """
    path = os.fspath(path)
    prepared = {}
    for name, value in arrays.items():
        array = np.asarray(value)
        if array.dtype not in _STORAGE_NAMES:
            raise TypeError(f"{name}: dtype {array.dtype} has no torch type.")
        prepared[name] = np.require(array, requirements="C")  # 0-d stays
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(suffix=".pth", dir=directory)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            _write(zf, f"{ARCHIVE}/data.pkl", _Pickle().state_dict(prepared))
            _write(zf, f"{ARCHIVE}/byteorder", b"little")
            for key, array in enumerate(prepared.values()):
                _write(zf, f"{ARCHIVE}/data/{key}", array)
            _write(zf, f"{ARCHIVE}/version", b"3\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
