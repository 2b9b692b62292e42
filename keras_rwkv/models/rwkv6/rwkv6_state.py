from typing import NamedTuple

from keras import ops


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
