import keras
from keras import ops

from keras_rwkv.models.rwkv6 import rwkv6_step_fusion
from keras_rwkv.models.rwkv6.rwkv6_projection import project
from keras_rwkv.models.rwkv6.rwkv6_projection import project_many
from keras_rwkv.ops.wkv6 import resolve_kernel
from keras_rwkv.ops.wkv6 import wkv6


@keras.saving.register_keras_serializable(package="keras_rwkv")
class RWKV6TimeMix(keras.layers.Layer):
    """RWKV6 time mixing ("attention"): data-dependent token shift, the
    WKV recurrence with data-dependent decay, per-head group norm and a
    SiLU gate.

    The layer takes the layer-normed input `x`, the previous-token input
    `previous` (see `rwkv6_token_shift`) and the incoming WKV state, and
    returns the mixed output and the outgoing WKV state. The same call
    serves whole sequences and single decoding steps.

    Args:
        hidden_dim: int. Model width C.
        head_size: int. Channels per head N (64 for every official model).
        mix_lora_dim: int. Rank of the token-shift LoRA (32 for up to 3B,
            64 for 7B and 14B).
        decay_lora_dim: int. Rank of the decay LoRA (64, or 128 for 7B/14B).
        group_norm_epsilon: float. Epsilon of the per-head group norm.
        wkv_kernel: str. `"auto"`, `"python"` or `"cuda"`.
        wkv_chunk_size: int. Chunk length of the Python WKV path.

    Examples:
    ```python
    layer = RWKV6TimeMix(hidden_dim=128, head_size=64, mix_lora_dim=32,
                         decay_lora_dim=64)
    x = np.random.rand(2, 5, 128).astype("float32")
    out, wkv_state = layer(x, x, np.ones((2, 5)), None)
    ```
    """

    def __init__(
        self,
        hidden_dim,
        head_size=64,
        mix_lora_dim=32,
        decay_lora_dim=64,
        group_norm_epsilon=64e-5,
        wkv_kernel="auto",
        wkv_chunk_size=16,
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
        if hidden_dim % head_size:
            raise ValueError(
                f"hidden_dim ({hidden_dim}) must be a multiple of head_size "
                f"({head_size})."
            )
        self.hidden_dim = hidden_dim
        self.head_size = head_size
        self.num_heads = hidden_dim // head_size
        self.mix_lora_dim = mix_lora_dim
        self.decay_lora_dim = decay_lora_dim
        self.group_norm_epsilon = group_norm_epsilon
        self.wkv_kernel = wkv_kernel
        self.wkv_chunk_size = wkv_chunk_size
        # What `wkv_kernel` stands for here, resolved at the first call
        # (so `KERAS_RWKV_WKV_KERNEL` is read once per layer, and building
        # or loading a model builds no CUDA kernel).
        self._wkv_resolved = None
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

        def dense(name):
            return keras.layers.Dense(
                hidden_dim,
                use_bias=False,
                kernel_initializer=self.kernel_initializer,
                dtype=self.dtype_policy,
                name=name,
            )

        self.receptance = dense("receptance")
        self.key = dense("key")
        self.value = dense("value")
        self.gate = dense("gate")
        self.output_dense = dense("output")

    def build(self, input_shape=None):
        c, h, n = self.hidden_dim, self.num_heads, self.head_size
        uniform = keras.initializers.RandomUniform
        small = keras.initializers.RandomNormal(stddev=0.01)
        self.time_maa_x = self.add_weight(
            shape=(c,), initializer=uniform(0.0, 1.0), name="time_maa_x"
        )
        # Static mixes of w, k, v, r, g (in that order).
        self.time_maa = self.add_weight(
            shape=(5, c), initializer=uniform(0.0, 1.0), name="time_maa"
        )
        self.time_maa_w1 = self.add_weight(
            shape=(c, 5 * self.mix_lora_dim),
            initializer=small,
            name="time_maa_w1",
        )
        self.time_maa_w2 = self.add_weight(
            shape=(5, self.mix_lora_dim, c),
            initializer=small,
            name="time_maa_w2",
        )
        # Decay parameters stay un-cast: the decay is computed in float32.
        self.time_decay = self.add_weight(
            shape=(c,),
            initializer=uniform(-6.0, -1.0),
            name="time_decay",
            autocast=False,
        )
        self.time_decay_w1 = self.add_weight(
            shape=(c, self.decay_lora_dim),
            initializer=small,
            name="time_decay_w1",
        )
        self.time_decay_w2 = self.add_weight(
            shape=(self.decay_lora_dim, c),
            initializer=small,
            name="time_decay_w2",
            autocast=False,
        )
        self.time_faaaa = self.add_weight(
            shape=(h, n),
            initializer=uniform(-0.5, 0.5),
            name="time_faaaa",
            autocast=False,
        )
        self.ln_x_gamma = self.add_weight(
            shape=(c,), initializer="ones", name="ln_x_gamma", autocast=False
        )
        self.ln_x_beta = self.add_weight(
            shape=(c,), initializer="zeros", name="ln_x_beta", autocast=False
        )
        for layer in (self.receptance, self.key, self.value, self.gate):
            layer.build((None, None, c))
        self.output_dense.build((None, None, c))
        self.built = True

    def call(self, x, previous, padding_mask, wkv_state):
        """Mixes `x` with `previous` and runs the WKV recurrence.

        Args:
            x: `[B, T, C]` layer-normed input.
            previous: `[B, T, C]` the previous real token's `x`.
            padding_mask: `[B, T]`, 1 for real tokens, 0 for pads.
            wkv_state: `[B or 1, H, N, N]` float32 or `None` for zeros.

        Returns:
            `(output [B, T, C], wkv_state [B, H, N, N] float32)`.
        """
        x, previous = (ops.cast(t, self.compute_dtype) for t in (x, previous))
        batch, seq_len = ops.shape(x)[0], ops.shape(x)[1]
        h, n = self.num_heads, self.head_size
        # A batch-1 step runs the mixes and decay, and the WKV step with
        # its norm and gate, as fused kernels (`rwkv6_step_fusion`).
        fused = self._fused_step(x)
        if fused is not None:
            mask = rwkv6_step_fusion.step_mask(padding_mask)
            maa_x, maa, decay = rwkv6_step_fusion.params(
                self.time_maa_x, self.time_maa, self.time_decay
            )
            w1, w2, dw1, dw2 = (
                ops.cast(w, "bfloat16")
                for w in (
                    self.time_maa_w1,
                    self.time_maa_w2,
                    self.time_decay_w1,
                    self.time_decay_w2,
                )
            )
            *mixed, log_w = fused.mix(
                x, previous, maa_x, maa, w1, w2, decay, dw1, dw2, mask
            )
            x_k, x_v, x_r, x_g = mixed
        else:
            x_w, x_k, x_v, x_r, x_g = self._mixes(x, previous)

        r, k, v, g = project_many(
            [
                (self.receptance, x_r),
                (self.key, x_k),
                (self.value, x_v),
                (self.gate, x_g),
            ]
        )
        if fused is not None:
            if wkv_state is None:
                wkv_state = ops.zeros((1, h, n, n), "float32")
            wkv_state = ops.cast(wkv_state, "float32")
            u, gamma, beta = rwkv6_step_fusion.params(
                self.time_faaaa, self.ln_x_gamma, self.ln_x_beta
            )
            y, wkv_state = fused.wkv_gate(
                r,
                k,
                v,
                g,
                log_w,
                u,
                wkv_state,
                gamma,
                beta,
                mask,
                self.group_norm_epsilon,
            )
            return project(self.output_dense, y), wkv_state

        mask = ops.cast(padding_mask, self.compute_dtype)[:, :, None]
        k = k * mask  # a pad adds nothing to the state...
        g = ops.silu(g)

        decay_lora = ops.matmul(
            ops.tanh(ops.matmul(x_w, self.time_decay_w1)),
            ops.cast(self.time_decay_w2, self.compute_dtype),
        )
        w_raw = ops.cast(self.time_decay, "float32") + ops.cast(
            decay_lora, "float32"
        )
        # ...and does not decay it (log decay 0).
        log_w = -ops.exp(w_raw) * ops.cast(mask, "float32")

        def heads(t):
            return ops.reshape(t, (batch, seq_len, h, n))

        if self._wkv_resolved is None:
            self._wkv_resolved = resolve_kernel(self.wkv_kernel)
        y, wkv_state = wkv6(
            heads(r),
            heads(k),
            heads(v),
            heads(log_w),
            self.time_faaaa,
            initial_state=wkv_state,
            kernel=self.wkv_kernel,
            chunk_size=self.wkv_chunk_size,
            resolved=self._wkv_resolved,
        )
        y = self._group_norm(ops.cast(y, "float32"))
        y = ops.reshape(y, (batch, seq_len, self.hidden_dim))
        y = ops.cast(y, self.compute_dtype) * g
        return project(self.output_dense, y), wkv_state

    def _mixes(self, x, previous):
        """The five token-shift mixes `x_w, x_k, x_v, x_r, x_g`."""
        batch, seq_len = ops.shape(x)[0], ops.shape(x)[1]
        sx = previous - x
        xxx = x + sx * self.time_maa_x
        mix = ops.tanh(ops.matmul(xxx, self.time_maa_w1))
        mix = ops.reshape(mix, (batch, seq_len, 5, self.mix_lora_dim))
        mix = ops.einsum("btfd,fdc->btfc", mix, self.time_maa_w2)
        mixed = x[:, :, None] + sx[:, :, None] * (self.time_maa + mix)
        return tuple(mixed[:, :, i] for i in range(5))

    def _fused_step(self, x):
        fused = rwkv6_step_fusion.fused_step_for(x)
        if fused is None or not rwkv6_step_fusion.shapes_ok(
            self.hidden_dim,
            self.mix_lora_dim,
            self.decay_lora_dim,
            self.head_size,
        ):
            return None
        return fused

    def _group_norm(self, y):
        """Per-head normalisation in float32, then the `ln_x` affine."""
        mean = ops.mean(y, axis=-1, keepdims=True)
        var = ops.mean(ops.square(y - mean), axis=-1, keepdims=True)
        y = (y - mean) / ops.sqrt(var + self.group_norm_epsilon)
        shape = (self.num_heads, self.head_size)
        gamma = ops.reshape(ops.cast(self.ln_x_gamma, "float32"), shape)
        beta = ops.reshape(ops.cast(self.ln_x_beta, "float32"), shape)
        return y * gamma + beta

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "head_size": self.head_size,
                "mix_lora_dim": self.mix_lora_dim,
                "decay_lora_dim": self.decay_lora_dim,
                "group_norm_epsilon": self.group_norm_epsilon,
                "wkv_kernel": self.wkv_kernel,
                "wkv_chunk_size": self.wkv_chunk_size,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
            }
        )
        return config
