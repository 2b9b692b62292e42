import os
import zipfile
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from keras_rwkv.utils.files import atomic_savez

STATE_FORMAT = "keras_rwkv.RWKV6State"
STATE_FORMAT_VERSION = 1


class RWKV6State(NamedTuple):
    """The recurrent state of a whole RWKV6 model.

    Everything the model remembers of the tokens it has read: a fixed size,
    whatever the context length. A NamedTuple of backend-native tensors, so
    it passes through `jax.jit`, `keras.ops` and `keras.tree` as a pytree.

    Fields:
        wkv: float32 `[B, L, H, N, N]`, per layer and head the WKV matrix
            in (key, value) order.
        shift: `[B, L, 2, C]` in the compute dtype, per layer the ln1 and
            ln2 outputs of the last token read (the token-shift inputs of
            TimeMix and ChannelMix).

    Examples:
    ```python
    hidden, state = backbone.call_with_state(token_ids, padding_mask)
    hidden, state = backbone.call_with_state(more_ids, more_mask, state)
    state = RWKV6State.zeros(backbone, batch_size=4)
    ```
    """

    wkv: object
    shift: object

    @property
    def batch_size(self):
        return self.wkv.shape[0]

    @classmethod
    def zeros(cls, backbone, batch_size=1):
        """An all-zero state (nothing read yet) for `backbone`."""
        n_layers, c = backbone.num_layers, backbone.hidden_dim
        h, n = c // backbone.head_size, backbone.head_size
        return cls(
            wkv=ops.zeros((batch_size, n_layers, h, n, n), "float32"),
            shift=ops.zeros(
                (batch_size, n_layers, 2, c), backbone.compute_dtype
            ),
        )

    def broadcast_to(self, batch_size):
        """Repeats a batch-1 state for `batch_size` rows."""
        if self.batch_size == batch_size:
            return self
        if self.batch_size != 1:
            raise ValueError(
                f"Cannot use a state of batch size {self.batch_size} for a "
                f"batch of {batch_size}: pass a state of batch 1 (shared by "
                f"every row) or of batch {batch_size}."
            )
        return RWKV6State(
            wkv=ops.repeat(self.wkv, batch_size, axis=0),
            shift=ops.repeat(self.shift, batch_size, axis=0),
        )

    def layer(self, index):
        """The state of one layer: `(time_mix_shift, channel_mix_shift,
        wkv)`, as `RWKV6Block` takes it."""
        return (
            self.shift[:, index, 0],
            self.shift[:, index, 1],
            self.wkv[:, index],
        )

    def layers(self):
        """Every layer's state, `[self.layer(i) for i in range(L)]`."""
        return [self.layer(i) for i in range(self.wkv.shape[1])]

    def save(self, path):
        """Writes the state to `path` (a `.npz` file; see `load`).

        The format is a plain NumPy `.npz` archive, readable anywhere
        without keras_rwkv and without pickle: `wkv` float32
        `[B, L, H, N, N]`, `shift` float32 `[B, L, 2, C]`, `dtype` the
        compute dtype of `shift` (str), `format` "keras_rwkv.RWKV6State"
        and `format_version` 1. Written to a temporary file and renamed,
        so an interrupted save never leaves a broken file.
        """
        return atomic_savez(
            path,
            wkv=ops.convert_to_numpy(self.wkv).astype(np.float32),
            shift=ops.convert_to_numpy(ops.cast(self.shift, "float32")),
            dtype=np.array(keras.backend.standardize_dtype(self.shift.dtype)),
            format=np.array(STATE_FORMAT),
            format_version=np.array(STATE_FORMAT_VERSION),
        )

    @classmethod
    def load(cls, path, dtype=None):
        """Reads a state written by `save` (never unpickles anything).

        Args:
            path: the `.npz` file.
            dtype: compute dtype for `shift`; defaults to the saved one.
        """
        try:
            wkv, shift, saved_dtype = _read_state_file(path)
        except (
            OSError,
            ValueError,
            KeyError,
            EOFError,
            zipfile.BadZipFile,
        ) as e:
            if isinstance(e, _StateFormatError):
                raise ValueError(str(e)) from None
            raise ValueError(
                f"{path} is not an RWKV6State file that can be read (saved "
                f"with RWKV6State.save): {type(e).__name__}: {e}. It may be "
                "damaged or truncated; save the state again."
            ) from None
        dtype = dtype or saved_dtype
        if wkv.ndim != 5 or shift.ndim != 4 or wkv.shape[:2] != shift.shape[:2]:
            raise ValueError(f"{path}: inconsistent state shapes.")
        for name, array in (("wkv", wkv), ("shift", shift)):
            if not np.all(np.isfinite(array)):
                raise ValueError(
                    f"{path}: the state's {name} holds NaN or infinite "
                    "values; it would make every output NaN. Save a good "
                    "state again."
                )
        return cls(
            wkv=ops.convert_to_tensor(wkv, "float32"),
            shift=ops.cast(ops.convert_to_tensor(shift), dtype),
        )

    def check_compatible(self, backbone):
        """Raises `ValueError` unless this state fits `backbone`."""
        n = backbone.head_size
        expected = (
            backbone.num_layers,
            backbone.hidden_dim // n,
            n,
            n,
        )
        if tuple(self.wkv.shape[1:]) != expected or tuple(
            self.shift.shape[1:]
        ) != (backbone.num_layers, 2, backbone.hidden_dim):
            raise ValueError(
                f"This state (wkv {tuple(self.wkv.shape)}, shift "
                f"{tuple(self.shift.shape)}) does not fit the model "
                f"({backbone.num_layers} layers, width "
                f"{backbone.hidden_dim}); it was made by another model."
            )

    @classmethod
    def from_layers(cls, layer_states):
        """Stacks per-layer `(shift_tm, shift_cm, wkv)` tuples."""
        return cls(
            wkv=ops.stack([s[2] for s in layer_states], axis=1),
            shift=ops.stack(
                [ops.stack([s[0], s[1]], axis=1) for s in layer_states],
                axis=1,
            ),
        )


class _StateFormatError(ValueError):
    """A readable file that is not a state this version can use."""


def _read_state_file(path):
    """`(wkv, shift, dtype)` from a `save`d file; every read inside, so
    that a damaged archive fails here (`np.load` reads lazily)."""
    with np.load(os.fspath(path), allow_pickle=False) as data:
        if (
            not hasattr(data, "files")
            or "format" not in data.files
            or (str(data["format"]) != STATE_FORMAT)
        ):
            raise _StateFormatError(
                f"{path} is not an RWKV6State file (saved with "
                "RWKV6State.save)."
            )
        version = int(data["format_version"])
        if version > STATE_FORMAT_VERSION:
            raise _StateFormatError(
                f"{path} has state format version {version}; this "
                "keras_rwkv reads up to version "
                f"{STATE_FORMAT_VERSION}. Upgrade keras_rwkv."
            )
        return data["wkv"], data["shift"], str(data["dtype"])
