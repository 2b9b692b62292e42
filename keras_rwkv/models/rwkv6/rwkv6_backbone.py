import keras
from keras import ops
from keras_hub.layers import ReversibleEmbedding
from keras_hub.models import Backbone

from keras_rwkv.models.rwkv6.rwkv6_block import RWKV6Block
from keras_rwkv.models.rwkv6.rwkv6_state import RWKV6State
from keras_rwkv.models.rwkv6.rwkv6_token_shift import shift_indices


@keras.saving.register_keras_serializable(package="keras_rwkv")
class RWKV6Backbone(Backbone):
    """The RWKV6 ("Finch", x060) recurrent language model core.

    Embeds `token_ids`, applies `ln0`, `num_layers` RWKV6 blocks and the
    final layer norm, and returns the hidden states `[B, T, hidden_dim]`.
    The untied output head lives in `token_embedding` (a KerasHub
    `ReversibleEmbedding` with `tie_weights=False`):
    `backbone.token_embedding(hidden, reverse=True)` gives the logits.

    Pads (`padding_mask == 0`) never touch the recurrent state, so left-
    and right-padded batches give the same results as each row alone.

    To carry the recurrent state between calls use `call_with_state`, which
    runs the very same layers and returns an `RWKV6State`.

    Args:
        vocabulary_size: int. Number of token ids (65536 for World models).
        num_layers: int. Number of RWKV6 blocks.
        hidden_dim: int. Model width C.
        intermediate_dim: int. Channel-mix width F.
        head_size: int. Channels per head (64 for every official model).
        mix_lora_dim: int. Rank of the token-shift LoRA (32, or 64 for
            7B/14B).
        decay_lora_dim: int. Rank of the decay LoRA (64, or 128 for 7B/14B).
        layer_norm_epsilon: float. Epsilon of every LayerNorm.
        group_norm_epsilon: float. Epsilon of the per-head group norm.
        wkv_kernel: str. WKV implementation: `"auto"`, `"python"` or
            `"cuda"`. Not a property of the weights; change it freely.
        wkv_chunk_size: int. Chunk length of the Python WKV path.
        dtype: string or `keras.DTypePolicy`. The WKV math, the decay and the
            group norm always run in float32.

    Examples:
    ```python
    backbone = keras_rwkv.RWKV6Backbone(
        vocabulary_size=1000, num_layers=2, hidden_dim=128,
        intermediate_dim=448,
    )
    x = {"token_ids": np.array([[5, 6, 7]]),
         "padding_mask": np.array([[1, 1, 1]])}
    hidden = backbone(x)
    logits = backbone.token_embedding(hidden, reverse=True)

    # Read a prompt in two pieces, carrying the state.
    _, state = backbone.call_with_state(np.array([[5, 6]]))
    hidden, state = backbone.call_with_state(np.array([[7]]), state=state)
    ```
    """

    def __init__(
        self,
        vocabulary_size,
        num_layers,
        hidden_dim,
        intermediate_dim,
        head_size=64,
        mix_lora_dim=32,
        decay_lora_dim=64,
        layer_norm_epsilon=1e-5,
        group_norm_epsilon=64e-5,
        wkv_kernel="auto",
        wkv_chunk_size=16,
        dtype=None,
        **kwargs,
    ):
        # === Layers ===
        self.token_embedding = ReversibleEmbedding(
            input_dim=vocabulary_size,
            output_dim=hidden_dim,
            tie_weights=False,
            embeddings_initializer=keras.initializers.RandomUniform(
                -1e-4, 1e-4
            ),
            dtype=dtype,
            name="token_embedding",
        )
        self.embeddings_layer_norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=dtype, name="ln0"
        )
        self.transformer_layers = [
            RWKV6Block(
                hidden_dim,
                intermediate_dim,
                head_size=head_size,
                mix_lora_dim=mix_lora_dim,
                decay_lora_dim=decay_lora_dim,
                layer_norm_epsilon=layer_norm_epsilon,
                group_norm_epsilon=group_norm_epsilon,
                wkv_kernel=wkv_kernel,
                wkv_chunk_size=wkv_chunk_size,
                dtype=dtype,
                name=f"block_{i}",
            )
            for i in range(num_layers)
        ]
        self.layer_norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=dtype, name="ln_out"
        )

        # === Functional Model ===
        token_id_input = keras.Input(
            shape=(None,), dtype="int32", name="token_ids"
        )
        padding_mask_input = keras.Input(
            shape=(None,), dtype="int32", name="padding_mask"
        )
        sequence_output, _ = self._run_layers(
            token_id_input, padding_mask_input, None
        )
        super().__init__(
            inputs={
                "token_ids": token_id_input,
                "padding_mask": padding_mask_input,
            },
            outputs=sequence_output,
            dtype=dtype,
            **kwargs,
        )

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.head_size = head_size
        self.num_heads = hidden_dim // head_size
        self.mix_lora_dim = mix_lora_dim
        self.decay_lora_dim = decay_lora_dim
        self.layer_norm_epsilon = layer_norm_epsilon
        self.group_norm_epsilon = group_norm_epsilon
        self.wkv_kernel = wkv_kernel
        self.wkv_chunk_size = wkv_chunk_size

    def _run_layers(self, token_ids, padding_mask, state):
        """The one forward pass, shared by the functional graph (`state`
        None, i.e. zeros) and `call_with_state`."""
        x = self.token_embedding(token_ids)
        x = self.embeddings_layer_norm(x)
        prev_index, last_index = shift_indices(padding_mask)
        layer_states = []
        for i, block in enumerate(self.transformer_layers):
            layer_state = None if state is None else state.layer(i)
            x, layer_state = block(
                x, padding_mask, prev_index, last_index, state=layer_state
            )
            layer_states.append(layer_state)
        return self.layer_norm(x), layer_states

    def initial_state(self, batch_size=1):
        """The state a sequence starts from when none is given: zeros."""
        return RWKV6State.zeros(self, batch_size)

    def call_with_state(self, token_ids, padding_mask=None, state=None):
        """Runs the backbone from `state` and returns the final state too.

        The same layers and math as calling the backbone; a pad leaves the
        state as it was, so left-padded rows continue exactly where their
        state stopped.

        Args:
            token_ids: int tensor `[B, T]` (T >= 1; T = 1 is a decode step).
            padding_mask: `[B, T]`, 1 for real tokens, 0 for pads; `None`
                means all real.
            state: an `RWKV6State` of batch B or 1, or `None` for zeros.

        Returns:
            `(hidden_states [B, T, hidden_dim], RWKV6State)`.
        """
        token_ids = ops.convert_to_tensor(token_ids, "int32")
        if padding_mask is None:
            padding_mask = ops.ones_like(token_ids)
        padding_mask = ops.convert_to_tensor(padding_mask, "int32")
        if state is not None:
            state = state.broadcast_to(ops.shape(token_ids)[0])
        hidden, layer_states = self._run_layers(token_ids, padding_mask, state)
        return hidden, RWKV6State.from_layers(layer_states)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "vocabulary_size": self.vocabulary_size,
                "num_layers": self.num_layers,
                "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim,
                "head_size": self.head_size,
                "mix_lora_dim": self.mix_lora_dim,
                "decay_lora_dim": self.decay_lora_dim,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "group_norm_epsilon": self.group_norm_epsilon,
                "wkv_kernel": self.wkv_kernel,
                "wkv_chunk_size": self.wkv_chunk_size,
            }
        )
        return config
