"""Tuned states in the RWKV-PEFT / BlinkDL format.

RWKV-PEFT saves a tuned state as a `.pth` of `blocks.{i}.att.time_state`,
`[H, N, N]` float32 in (value, key) order, which BlinkDL's `rwkv` applies
once merged into the model's state dict. That format has no token-shift
states. `RWKV6Backbone.export_time_state` and `import_time_state` call
these; reading never executes code from the file (`torch_checkpoint.py`),
and writing needs no torch (`pth_writer.py`).
"""

from keras_rwkv.convert.blinkdl import time_state_arrays
from keras_rwkv.convert.blinkdl import time_state_dict
from keras_rwkv.convert.pth_writer import save_torch_checkpoint
from keras_rwkv.convert.torch_checkpoint import CheckpointError
from keras_rwkv.convert.torch_checkpoint import load_torch_checkpoint


def tuned_time_state(backbone, drop_time_shift=False):
    """`backbone`'s tuned WKV state as `blocks.{i}.att.time_state`
    entries. Tuned token-shift states do not fit the format:
    `drop_time_shift=True` leaves them out, otherwise it raises."""
    arrays = backbone.tuned_state_arrays()
    if "shift" in arrays and not drop_time_shift:
        raise ValueError(
            "The RWKV-PEFT time_state format cannot hold the tuned "
            "token-shift states. Pass drop_time_shift=True to export the "
            "WKV state alone, or use save_tuned_state() to keep both."
        )
    return time_state_dict(arrays["wkv"])


def export_time_state(backbone, path, drop_time_shift=False):
    """Writes `backbone`'s tuned WKV state to `path` (a `.pth`); returns
    the path (see `tuned_time_state`)."""
    return save_torch_checkpoint(
        tuned_time_state(backbone, drop_time_shift), path
    )


def import_time_state(backbone, path):
    """Reads `blocks.{i}.att.time_state` from a state file, or a model
    file with the states merged in, into `backbone`'s tuned WKV state (a
    tuned token-shift state is kept as it was)."""
    wkv = time_state_arrays(
        load_torch_checkpoint(path), backbone.num_layers, str(path)
    )
    if wkv is None:
        raise CheckpointError(
            f"{path} holds no blocks.*.att.time_state; it is not an "
            "RWKV-PEFT state file."
        )
    shift = None
    if backbone.tuned_state == "wkv+shift":
        shift = backbone.tuned_state_arrays()["shift"]
    backbone.set_tuned_state_arrays(wkv, shift)
