"""Read PyTorch `.pth` checkpoints without PyTorch and without running code.

A `.pth` written by `torch.save` is a zip archive holding a pickle
(`data.pkl`) and one raw little-endian buffer per storage (`data/<key>`).
Plain `pickle.load` of such a file can execute arbitrary code, so we read
the pickle with an unpickler that only knows the handful of globals a
tensor state dict needs and refuses everything else. Tensor data is
memory-mapped straight out of the (uncompressed) archive, so a 28 GB
checkpoint costs no more RAM than the tensors actually read.
"""

import collections
import pickle
import struct
import zipfile
import zlib

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message says why and what to
    do."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint's pickle asks for code we refuse to run."""


CRC_BLOCK = 1 << 26  # bytes read at a time for the CRC


class _StorageType:
    def __init__(self, name):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    """A lazily read storage: (dtype, key in the archive, element count)."""

    def __init__(self, reader, dtype, key, numel):
        self.reader, self.dtype, self.key, self.numel = (
            reader,
            dtype,
            key,
            numel,
        )

    def array(self):
        return self.reader.storage_array(self.key, self.dtype, self.numel)


def _rebuild_tensor(storage, offset, size, stride, *_unused):
    if not isinstance(storage, _Storage):
        raise CheckpointError("Malformed checkpoint: tensor without storage.")
    flat = storage.array()
    size, stride = tuple(size), tuple(stride)
    if size:
        last = offset + sum((s - 1) * st for s, st in zip(size, stride))
        if min(size) > 0 and (offset < 0 or last >= flat.size):
            raise CheckpointError(
                "Malformed checkpoint: a tensor reaches past its storage."
            )
    else:
        if offset >= flat.size:
            raise CheckpointError(
                "Malformed checkpoint: a tensor reaches past its storage."
            )
    item = flat.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        flat[offset:],
        shape=size,
        strides=tuple(st * item for st in stride),
        writeable=False,
    )


def _rebuild_parameter(data, *_unused):
    return data


# The only globals a tensor state dict needs, mapped to our own code.
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, reader):
        super().__init__(file)
        self.reader = reader

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        raise UnsafeCheckpointError(
            f"Refusing to load {self.reader.path}: its pickle asks for "
            f"`{module}.{name}`, which a plain tensor checkpoint never "
            "needs and which could run code. Only load checkpoints you "
            "trust; if this one is, re-save it as a plain state dict of "
            "tensors (`torch.save(dict(model.state_dict()), path)`)."
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise CheckpointError(
                f"Malformed checkpoint {self.reader.path}: unknown "
                f"persistent id {pid!r}."
            )
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise UnsafeCheckpointError(
                f"Refusing to load {self.reader.path}: unsupported storage "
                f"type {storage_type!r}."
            )
        return _Storage(self.reader, storage_type.dtype, str(key), numel)


class _ZipReader:
    def __init__(self, path, zf):
        self.path, self.zf = path, zf
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl")]
        if len(pkl) != 1:
            raise CheckpointError(
                f"{path} is a zip file but not a PyTorch checkpoint "
                "(no data.pkl inside)."
            )
        self.prefix = pkl[0][: -len("data.pkl")]
        order = self.prefix + "byteorder"
        self.big_endian = order in names and zf.read(order).strip() == b"big"

    def storage_array(self, key, dtype, numel):
        name = f"{self.prefix}data/{key}"
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise CheckpointError(
                f"Checkpoint {self.path} is damaged: storage {key} is "
                "missing. Download it again."
            ) from None
        nbytes = numel * dtype.itemsize
        if info.file_size < nbytes:
            raise CheckpointError(
                f"Checkpoint {self.path} is damaged: storage {key} holds "
                f"{info.file_size} bytes, {nbytes} expected."
            )
        if info.compress_type == zipfile.ZIP_STORED:
            with open(self.path, "rb") as f:
                f.seek(info.header_offset)
                header = f.read(30)
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            raw = np.memmap(
                self.path,
                dtype=np.uint8,
                mode="r",
                offset=start,
                shape=(info.file_size,),
            )
            self._check_crc(raw, info, key)
            array = raw[:nbytes].view(dtype)
        else:
            try:
                data = self.zf.read(name)  # zipfile checks the CRC
            except zipfile.BadZipFile as e:
                raise self._damaged(key, e) from None
            array = np.frombuffer(data, dtype=dtype)[:numel]
        if self.big_endian:
            array = array.byteswap()
        return array

    def _check_crc(self, raw, info, key):
        """The zip's CRC-32 of a memory-mapped (stored) entry: flipped
        bytes are caught here, not in the model's outputs."""
        crc = 0
        for start in range(0, raw.size, CRC_BLOCK):
            crc = zlib.crc32(raw[start : start + CRC_BLOCK], crc)
        if crc != info.CRC:
            raise self._damaged(key, "its CRC-32 does not match")

    def _damaged(self, key, why):
        return CheckpointError(
            f"Checkpoint {self.path} is damaged: storage {key} fails the "
            f"zip's integrity check ({why}). Download or copy it again."
        )


def load_torch_checkpoint(path):
    """Reads a `torch.save` zip checkpoint into numpy arrays, safely.

    Never executes code from the file: only tensors, dicts, lists and
    scalars can be rebuilt; any other global in the pickle is refused with
    `UnsafeCheckpointError`.

    Args:
        path: path to a `.pth` / `.pt` file written by `torch.save` (zip
            format, PyTorch >= 1.6).

    Returns:
        What was saved, with tensors as read-only (memory-mapped) numpy
        arrays. For model checkpoints, a dict of name -> array.

    Raises:
        CheckpointError: the file is missing, truncated or not a PyTorch
            zip checkpoint.
        UnsafeCheckpointError: the pickle asks for code.
    """
    path = str(path)
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise CheckpointError(f"No such checkpoint file: {path}") from None
    except zipfile.BadZipFile:
        with open(path, "rb") as f:
            magic = f.read(2)
        if magic in (b"\x80\x02", b"\x80\x04") or magic[:1] == b"\x80":
            raise CheckpointError(
                f"{path} uses PyTorch's legacy (pre-1.6, non-zip) format. "
                "Re-save it with a current PyTorch: "
                "`torch.save(torch.load(path, weights_only=True), new_path)`."
            ) from None
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint: the file is "
            "truncated or corrupt (no zip directory at its end). If it was "
            "downloaded, download it again."
        ) from None
    with zf:
        reader = _ZipReader(path, zf)
        with zf.open(reader.prefix + "data.pkl") as f:
            try:
                return _RestrictedUnpickler(f, reader).load()
            except (CheckpointError, MemoryError):
                raise
            except Exception as e:
                raise CheckpointError(
                    f"Checkpoint {path} is corrupt: its pickle cannot be "
                    f"read ({type(e).__name__}: {e})."
                ) from e
