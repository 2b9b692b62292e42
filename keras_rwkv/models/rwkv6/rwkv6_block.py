import keras

from keras_rwkv.models.rwkv6 import rwkv6_step_fusion
from keras_rwkv.models.rwkv6.rwkv6_channel_mix import RWKV6ChannelMix
from keras_rwkv.models.rwkv6.rwkv6_time_mix import RWKV6TimeMix
from keras_rwkv.models.rwkv6.rwkv6_token_shift import runs_contiguous
from keras_rwkv.models.rwkv6.rwkv6_token_shift import token_shift

# Trainable initial states a block can carry (state tuning).
TUNED_STATES = (None, "wkv", "wkv+shift")


@keras.saving.register_keras_serializable(package="keras_rwkv")
class RWKV6Block(keras.layers.Layer):
    """One RWKV6 layer: `x += TimeMix(ln1(x))`, then
    `x += ChannelMix(ln2(x))`, carrying a recurrent state.

    The layer state is a tuple `(time_mix_shift [B, C],
    channel_mix_shift [B, C], wkv [B, H, N, N])`; `None` means zeros. The
    same call runs whole sequences (prefill, training) and single steps
    (decoding): there is no separate generation path.

    Args:
        hidden_dim: int. Model width C.
        intermediate_dim: int. Feedforward width F.
        head_size: int. Channels per head N.
        mix_lora_dim: int. Rank of the token-shift LoRA.
        decay_lora_dim: int. Rank of the decay LoRA.
        layer_norm_epsilon: float. Epsilon of ln1 and ln2.
        group_norm_epsilon: float. Epsilon of the per-head group norm.
        wkv_kernel: str. `"auto"`, `"python"` or `"cuda"`.
        wkv_chunk_size: int. Chunk length of the Python WKV path.
        tuned_state: `None`, `"wkv"` or `"wkv+shift"`: trainable initial
            states used when no state is passed (see
            `RWKV6Backbone.enable_state_tuning`).

    Examples:
    ```python
    block = RWKV6Block(hidden_dim=128, intermediate_dim=448)
    x = np.random.rand(2, 5, 128).astype("float32")
    mask = np.ones((2, 5), "int32")
    prev_index, last_index = shift_indices(mask)
    y, state = block(x, mask, prev_index, last_index)
    ```
    """

    def __init__(
        self,
        hidden_dim,
        intermediate_dim,
        head_size=64,
        mix_lora_dim=32,
        decay_lora_dim=64,
        layer_norm_epsilon=1e-5,
        group_norm_epsilon=64e-5,
        wkv_kernel="auto",
        wkv_chunk_size=16,
        tuned_state=None,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        # Keras would cast every floating argument to the compute dtype,
        # the float32 WKV state too: a bfloat16 model's state would lose
        # precision at every call (and a pad would change it). `call`
        # converts and casts its inputs itself, arrays included.
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True
        if tuned_state not in TUNED_STATES:
            raise ValueError(
                f"tuned_state={tuned_state!r}; use one of {TUNED_STATES}."
            )
        self.tuned_state = tuned_state
        self.initial_wkv = None
        self.initial_shift = None
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.head_size = head_size
        self.mix_lora_dim = mix_lora_dim
        self.decay_lora_dim = decay_lora_dim
        self.layer_norm_epsilon = layer_norm_epsilon
        self.group_norm_epsilon = group_norm_epsilon
        self.wkv_kernel = wkv_kernel
        self.wkv_chunk_size = wkv_chunk_size
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

        def layer_norm(name):
            return keras.layers.LayerNormalization(
                epsilon=layer_norm_epsilon, dtype=self.dtype_policy, name=name
            )

        self.ln1 = layer_norm("ln1")
        self.ln2 = layer_norm("ln2")
        self.time_mix = RWKV6TimeMix(
            hidden_dim,
            head_size=head_size,
            mix_lora_dim=mix_lora_dim,
            decay_lora_dim=decay_lora_dim,
            group_norm_epsilon=group_norm_epsilon,
            wkv_kernel=wkv_kernel,
            wkv_chunk_size=wkv_chunk_size,
            kernel_initializer=self.kernel_initializer,
            dtype=self.dtype_policy,
            name="time_mix",
        )
        self.channel_mix = RWKV6ChannelMix(
            hidden_dim,
            intermediate_dim,
            kernel_initializer=self.kernel_initializer,
            dtype=self.dtype_policy,
            name="channel_mix",
        )

    def build(self, input_shape=None):
        shape = (None, None, self.hidden_dim)
        for layer in (self.ln1, self.ln2, self.time_mix, self.channel_mix):
            layer.build(shape)
        self._add_tuned_state(self.tuned_state)
        self.built = True

    def _add_tuned_state(self, tuned_state):
        """Creates the trainable initial-state variables (zeros, float32)."""
        if tuned_state is None:
            return
        n, c = self.head_size, self.hidden_dim
        if self.initial_wkv is None:
            self.initial_wkv = self.add_weight(
                shape=(c // n, n, n),
                initializer="zeros",
                dtype="float32",
                autocast=False,
                name="initial_wkv",
            )
        if tuned_state == "wkv+shift" and self.initial_shift is None:
            self.initial_shift = self.add_weight(
                shape=(2, c),
                initializer="zeros",
                dtype="float32",
                autocast=False,
                name="initial_shift",
            )
        self.tuned_state = (
            "wkv+shift" if self.initial_shift is not None else "wkv"
        )

    def enable_state_tuning(self, time_shift=True):
        """Adds the tuned initial states (kept if they already exist).
        Freezing the other weights is the backbone's job."""
        self._tracker.unlock()
        try:
            self._add_tuned_state("wkv+shift" if time_shift else "wkv")
        finally:
            self._tracker.lock()

    def initial_layer_state(self, batch_size, dtype):
        """`(shift_tm, shift_cm, wkv)` a sequence starts from when no state
        is given: the tuned states if any (shared by the batch), else
        zeros. `wkv` has batch 1 (the WKV op broadcasts it)."""
        c, n = self.hidden_dim, self.head_size
        if self.initial_shift is not None:
            shift = keras.ops.cast(self.initial_shift, dtype)
            shift_tm = keras.ops.broadcast_to(shift[0], (batch_size, c))
            shift_cm = keras.ops.broadcast_to(shift[1], (batch_size, c))
        else:
            shift_tm = shift_cm = keras.ops.zeros((batch_size, c), dtype)
        if self.initial_wkv is not None:
            wkv = keras.ops.convert_to_tensor(self.initial_wkv)[None]
        else:
            wkv = keras.ops.zeros((1, c // n, n, n), "float32")
        return shift_tm, shift_cm, wkv

    def call(
        self,
        x,
        padding_mask,
        prev_index,
        last_index,
        state=None,
        contiguous=None,
    ):
        """Runs the layer.

        Args:
            x: `[B, T, C]` residual stream.
            padding_mask: `[B, T]`, 1 for real tokens and 0 for pads.
            prev_index, last_index: token-shift indices from
                `shift_indices(padding_mask)`.
            state: `(time_mix_shift, channel_mix_shift, wkv)` or `None`.
            contiguous: `runs_contiguous(prev_index, last_index, T)`, shared
                by the layers of a pass; computed here if `None`.

        Returns:
            `(x [B, T, C], new_state)`.
        """
        x = keras.ops.cast(x, self.compute_dtype)
        if state is None:
            state = self.initial_layer_state(
                keras.ops.shape(x)[0], self.compute_dtype
            )
        shift_tm, shift_cm, wkv = state

        # A batch-1 step may run its norms (and the residual add before
        # ln2) as fused kernels (`rwkv6_step_fusion`); the math is the same.
        fused = rwkv6_step_fusion.fused_step_for(x)
        xx = rwkv6_step_fusion.norm(fused, self.ln1, x)
        if contiguous is None and x.shape[1] != 1:
            contiguous = runs_contiguous(prev_index, last_index, x.shape[1])
        previous, shift_tm = token_shift(
            xx, shift_tm, prev_index, last_index, contiguous
        )
        out, wkv = self.time_mix(xx, previous, padding_mask, wkv)

        xx, x = rwkv6_step_fusion.norm(fused, self.ln2, x, delta=out)
        previous, shift_cm = token_shift(
            xx, shift_cm, prev_index, last_index, contiguous
        )
        x = x + self.channel_mix(xx, previous)
        return x, (shift_tm, shift_cm, wkv)

    def compute_output_spec(self, x, *args, **kwargs):
        # Declared rather than traced: with unknown T some backends (TF)
        # cannot trace the chunked scan symbolically.
        batch, c = x.shape[0], self.hidden_dim
        n = self.head_size
        shift = keras.KerasTensor((batch, c), dtype=self.compute_dtype)
        wkv = keras.KerasTensor((batch, c // n, n, n), dtype="float32")
        return (
            keras.KerasTensor(x.shape, dtype=self.compute_dtype),
            (shift, shift, wkv),
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim,
                "head_size": self.head_size,
                "mix_lora_dim": self.mix_lora_dim,
                "decay_lora_dim": self.decay_lora_dim,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "group_norm_epsilon": self.group_norm_epsilon,
                "wkv_kernel": self.wkv_kernel,
                "wkv_chunk_size": self.wkv_chunk_size,
                "tuned_state": self.tuned_state,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
            }
        )
        return config
