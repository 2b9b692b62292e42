import keras
from keras import ops

from keras_rwkv.models.rwkv6.rwkv6_projection import project
from keras_rwkv.models.rwkv6.rwkv6_projection import project_many


@keras.saving.register_keras_serializable(package="keras_rwkv")
class RWKV6ChannelMix(keras.layers.Layer):
    """RWKV6 channel mixing: token shift, then a squared-ReLU feedforward
    gated by a sigmoid receptance.

    `out = sigmoid(receptance(x_r)) * value(relu(key(x_k)) ** 2)` with
    `x_k = x + (previous - x) * time_maa_k` and likewise `x_r`.

    Args:
        hidden_dim: int. Model width C.
        intermediate_dim: int. Feedforward width F (3.5 * C officially).

    Examples:
    ```python
    layer = RWKV6ChannelMix(hidden_dim=128, intermediate_dim=448)
    x = np.random.rand(2, 5, 128).astype("float32")
    out = layer(x, x)
    ```
    """

    def __init__(
        self,
        hidden_dim,
        intermediate_dim,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

        def dense(units, name):
            return keras.layers.Dense(
                units,
                use_bias=False,
                kernel_initializer=self.kernel_initializer,
                dtype=self.dtype_policy,
                name=name,
            )

        self.key = dense(intermediate_dim, "key")
        self.receptance = dense(hidden_dim, "receptance")
        self.value = dense(hidden_dim, "value")

    def build(self, input_shape=None):
        uniform = keras.initializers.RandomUniform(0.0, 1.0)
        c = self.hidden_dim
        self.time_maa_k = self.add_weight(
            shape=(c,), initializer=uniform, name="time_maa_k"
        )
        self.time_maa_r = self.add_weight(
            shape=(c,), initializer=uniform, name="time_maa_r"
        )
        self.key.build((None, None, c))
        self.receptance.build((None, None, c))
        self.value.build((None, None, self.intermediate_dim))
        self.built = True

    def call(self, x, previous):
        """Args: `x` `[B, T, C]` layer-normed input; `previous` `[B, T, C]`
        the previous real token's `x`. Returns `[B, T, C]`."""
        sx = previous - x
        k, r = project_many(
            [
                (self.key, x + sx * self.time_maa_k),
                (self.receptance, x + sx * self.time_maa_r),
            ]
        )
        return ops.sigmoid(r) * project(self.value, ops.square(ops.relu(k)))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
            }
        )
        return config
