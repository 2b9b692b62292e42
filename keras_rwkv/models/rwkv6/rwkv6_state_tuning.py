"""State tuning on an RWKV6 backbone: its methods, as a mixin of
`RWKV6Backbone`.

The tuned states themselves live in the blocks (`initial_wkv`,
`initial_shift`); these methods turn them on, read and write them, and
move them to and from files (ours, `.npz` without pickle, and RWKV-PEFT's
`.pth`).
"""

import numpy as np
from keras import ops


class RWKV6StateTuning:
    """`enable_state_tuning` and the tuned states' I/O for
    `RWKV6Backbone` (it needs `transformer_layers`, `head_size`,
    `hidden_dim`, `num_layers`).

    Examples:
    ```python
    backbone.enable_state_tuning(time_shift=True)
    # ... fit ...
    backbone.save_tuned_state("state.npz")
    backbone.load_tuned_state("state.npz")
    ```
    """

    @property
    def tuned_state(self):
        """`None`, `"wkv"` or `"wkv+shift"`: which trainable initial states
        the layers carry (see `enable_state_tuning`)."""
        return self.transformer_layers[0].tuned_state

    def enable_state_tuning(self, time_shift=True):
        """Trains the initial recurrent state instead of the weights.

        Freezes every existing weight (LoRA weights included) and gives each
        layer trainable float32 initial states, starting at zero: the WKV
        state `[H, N, N]` and, with `time_shift=True`, the TimeMix and
        ChannelMix token-shift states `[C]`. They are used whenever no
        explicit state is passed (`fit`, calls, `generate`, `prefill`), and
        shared by every row of a batch. An explicit `state` replaces them.

        Calling it again keeps the tuned values (adds the shift states if
        `time_shift` is now True, freezes them if it is now False) and
        re-freezes everything else, LoRA weights included; `enable_lora`
        afterwards freezes the states in turn. Compile (again) after
        calling it: `fit` says so otherwise.

        Args:
            time_shift: bool. Also tune the token-shift states.
        """
        self.trainable = True
        for layer in self._flatten_layers(include_self=False):
            layer.trainable = False
        for block in self.transformer_layers:
            block.trainable = True
            for layer in block._flatten_layers(include_self=False):
                layer.trainable = False
            block.enable_state_tuning(time_shift)
            if block.initial_shift is not None:
                # Kept (it holds tuned values) but frozen when not asked for.
                block.initial_shift.trainable = bool(time_shift)

    def tuned_state_arrays(self):
        """The tuned states as numpy: `{"wkv": [L, H, N, N]}` plus
        `"shift": [L, 2, C]` if tuned."""
        if self.tuned_state is None:
            raise ValueError(
                "This backbone has no tuned state; call "
                "enable_state_tuning() first."
            )
        blocks = self.transformer_layers
        out = {
            "wkv": np.stack(
                [ops.convert_to_numpy(b.initial_wkv) for b in blocks]
            )
        }
        if self.tuned_state == "wkv+shift":
            out["shift"] = np.stack(
                [ops.convert_to_numpy(b.initial_shift) for b in blocks]
            )
        return out

    def set_tuned_state_arrays(self, wkv, shift=None):
        """Assigns tuned states, creating the state variables if needed
        (without freezing anything)."""
        n, c, layers = self.head_size, self.hidden_dim, self.num_layers
        wkv = np.asarray(wkv, np.float32)
        if wkv.shape != (layers, c // n, n, n):
            raise ValueError(
                f"Tuned WKV state has shape {wkv.shape}; this model needs "
                f"{(layers, c // n, n, n)}."
            )
        if shift is not None:
            shift = np.asarray(shift, np.float32)
            if shift.shape != (layers, 2, c):
                raise ValueError(
                    f"Tuned shift state has shape {shift.shape}; this model "
                    f"needs {(layers, 2, c)}."
                )
        for name, array in (("WKV", wkv), ("shift", shift)):
            if array is not None and not np.all(np.isfinite(array)):
                raise ValueError(
                    f"Tuned {name} state holds NaN or infinite values; "
                    "every output would be NaN. Use a good state file."
                )
        # Adds the state variables if missing; freezes nothing (that is
        # enable_state_tuning's job).
        time_shift = shift is not None or self.tuned_state == "wkv+shift"
        for block in self.transformer_layers:
            block.enable_state_tuning(time_shift)
        for i, block in enumerate(self.transformer_layers):
            block.initial_wkv.assign(wkv[i])
            if block.initial_shift is not None:
                block.initial_shift.assign(
                    shift[i] if shift is not None else np.zeros((2, c))
                )

    def save_tuned_state(self, path):
        """Writes just the tuned states to a small `.npz` file (`wkv`
        `[L, H, N, N]` in (key, value) order, and `shift` `[L, 2, C]` if
        tuned). Load with `load_tuned_state`."""
        from keras_rwkv.utils.files import atomic_savez

        return atomic_savez(
            path, format="keras_rwkv.tuned_state", **self.tuned_state_arrays()
        )

    def load_tuned_state(self, path):
        """Reads a file written by `save_tuned_state` (no pickle)."""
        with np.load(path, allow_pickle=False) as data:
            if str(data.get("format", "")) != "keras_rwkv.tuned_state":
                raise ValueError(
                    f"{path} is not a tuned-state file (save_tuned_state)."
                )
            shift = data["shift"] if "shift" in data.files else None
            self.set_tuned_state_arrays(data["wkv"], shift)

    def export_time_state(self, path, drop_time_shift=False):
        """Writes the tuned WKV state as an RWKV-PEFT / BlinkDL
        `blocks.{i}.att.time_state` `.pth` (no torch needed). That format has
        no token-shift states: if they are tuned, pass
        `drop_time_shift=True` (or keep everything with
        `save_tuned_state`). See `convert/rwkv_peft.py`."""
        from keras_rwkv.convert import rwkv_peft

        return rwkv_peft.export_time_state(self, path, drop_time_shift)

    def import_time_state(self, path):
        """Reads an RWKV-PEFT / BlinkDL time-state `.pth` (a state file or
        a model with the states merged in) into the tuned WKV state,
        without executing code from it."""
        from keras_rwkv.convert import rwkv_peft

        rwkv_peft.import_time_state(self, path)
