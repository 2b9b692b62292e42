import keras
from keras import ops
from keras_hub.layers import ReversibleEmbedding
from keras_hub.models import Backbone

from keras_rwkv.models.rwkv6.rwkv6_block import RWKV6Block
from keras_rwkv.models.rwkv6.rwkv6_layout_map import layout_map
from keras_rwkv.models.rwkv6.rwkv6_quantize import drop_int8_input_quantizers
from keras_rwkv.models.rwkv6.rwkv6_quantize import is_weight_only_int8
from keras_rwkv.models.rwkv6.rwkv6_quantize import quantize_with_filter
from keras_rwkv.models.rwkv6.rwkv6_quantize import quantized_layer_policies
from keras_rwkv.models.rwkv6.rwkv6_quantize import with_quantized_layers
from keras_rwkv.models.rwkv6.rwkv6_state import RWKV6State
from keras_rwkv.models.rwkv6.rwkv6_state_tuning import RWKV6StateTuning
from keras_rwkv.models.rwkv6.rwkv6_token_shift import runs_contiguous
from keras_rwkv.models.rwkv6.rwkv6_token_shift import shift_indices
from keras_rwkv.models.rwkv6.rwkv6_weight_checks import load_checked


@keras.saving.register_keras_serializable(package="keras_rwkv")
class RWKV6Backbone(RWKV6StateTuning, Backbone):
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
            `"cuda"`. A choice of this run, not saved with the model:
            pass it to `from_preset` to choose again.
        wkv_chunk_size: int. Chunk length of the Python WKV path (not
            saved either).
        tuned_state: `None`, `"wkv"` or `"wkv+shift"`: trainable initial
            states (set by `enable_state_tuning`; kept in presets).
        int8_weight_only: bool. The int8 layers of a saved weight-only int8
            model quantize no input (kept in presets; see
            `rwkv6_quantize.py`).
        quantized_layers: dict. The dtype policies of a saved quantized
            model's layers, by path (kept in presets, so that
            `Backbone.from_preset` rebuilds them; see `rwkv6_quantize.py`).
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
        tuned_state=None,
        int8_weight_only=False,
        quantized_layers=None,
        dtype=None,
        **kwargs,
    ):
        dtype = with_quantized_layers(dtype, quantized_layers)
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
                tuned_state=tuned_state,
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
            token_id_input, padding_mask_input, None, None
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
        if int8_weight_only:
            drop_int8_input_quantizers(self)

    @staticmethod
    def get_layout_map(
        device_mesh,
        model_parallel_dim_name="model",
        data_parallel_dim_name="batch",
    ):
        """A `keras.distribution.LayoutMap` for model-parallel training and
        generation.

        The big matrices are split over the model axis the Megatron way:
        TimeMix receptance/key/value/gate and ChannelMix key/receptance by
        their output channels (for TimeMix that is whole heads, so the WKV
        recurrence and the per-head group norm run locally), TimeMix output
        and ChannelMix value by their input channels (one reduction per
        mix), the embedding and the head by the vocabulary. As in KerasHub
        (Gemma, Llama), the other axis of each of these matrices is split
        over the data axis (FSDP-like: weights, gradients and optimizer
        states are divided by the whole mesh, at the price of gathering
        each weight over the data axis when it is used). LoRA factors
        (after `enable_lora`) follow the kernel they adapt. Everything
        else (layer norms, token-shift mixes, the small decay and mix
        LoRA matrices, `time_faaaa`, the tuned initial states) is small
        and replicated.

        The split dimensions must be divisible by the axis sizes:
        `hidden_dim`, `intermediate_dim` and `vocabulary_size` by both,
        and the number of heads (`hidden_dim / head_size`) by the model
        axis, so that no head is split.

        Create the model (and call `enable_lora` / `enable_state_tuning`)
        while the distribution is set, so that new variables get their
        layout.

        Args:
            device_mesh: a `keras.distribution.DeviceMesh`.
            model_parallel_dim_name: str. The mesh axis the weights are
                split over (tensor parallelism).
            data_parallel_dim_name: str or `None`. The mesh axis the batch
                is split over; the big weights are also split over it
                (FSDP-like). `None` keeps the weights whole along the data
                axis (replicated on every data-parallel replica): plain
                tensor parallelism, which saves the per-step weight
                gathers, e.g. for decoding.

        Returns:
            A `keras.distribution.LayoutMap` for the backbone's weights.

        Examples:
        ```python
        devices = keras.distribution.list_devices()
        mesh = keras.distribution.DeviceMesh(
            shape=(2, 4), axis_names=("batch", "model"), devices=devices
        )
        layout_map = RWKV6Backbone.get_layout_map(mesh)
        distribution = keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch"
        )
        keras.distribution.set_distribution(distribution)
        lm = keras_hub.models.CausalLM.from_preset("rwkv6_world_7b")
        for v in lm.backbone.get_layer("block_0").weights:
            print(v.path, v.shape, v.value.sharding.spec)
        ```
        """
        return layout_map(
            device_mesh, model_parallel_dim_name, data_parallel_dim_name
        )

    def default_lora_layer_names(self):
        """LoRA targets: the TimeMix receptance/key/value/gate/output and the
        ChannelMix key/value/receptance projections (layer names)."""
        return ["receptance", "key", "value", "gate", "output"]

    def initial_state(self, batch_size=1):
        """The state a sequence starts from when none is given: the tuned
        states if any (see `enable_state_tuning`), else zeros."""
        layer_states = [
            block.initial_layer_state(batch_size, self.compute_dtype)
            for block in self.transformer_layers
        ]
        state = RWKV6State.from_layers(layer_states)  # wkv has batch 1
        wkv_shape = (batch_size,) + tuple(state.wkv.shape[1:])
        return RWKV6State(ops.broadcast_to(state.wkv, wkv_shape), state.shift)

    def _run_layers(self, token_ids, padding_mask, layer_states, contiguous):
        """The one forward pass, shared by the functional graph
        (`layer_states` None, i.e. zeros) and `call_with_state`."""
        x = self.token_embedding(token_ids)
        x = self.embeddings_layer_norm(x)
        prev_index, last_index = shift_indices(padding_mask)
        # A step's shift needs no test; a symbolic pass none either.
        if (
            contiguous is None
            and x.shape[1] != 1
            and not isinstance(x, keras.KerasTensor)
        ):
            contiguous = runs_contiguous(prev_index, last_index, x.shape[1])
        states_in = layer_states or [None] * len(self.transformer_layers)
        layer_states = []
        for block, layer_state in zip(self.transformer_layers, states_in):
            x, layer_state = block(
                x,
                padding_mask,
                prev_index,
                last_index,
                state=layer_state,
                contiguous=contiguous,
            )
            layer_states.append(layer_state)
        return self.layer_norm(x), layer_states

    def call_with_state(
        self, token_ids, padding_mask=None, state=None, contiguous=None
    ):
        """Runs the backbone from `state` and returns the final state too.

        The same layers and math as calling the backbone; a pad leaves the
        state as it was, so left-padded rows continue exactly where their
        state stopped.

        Args:
            token_ids: int tensor `[B, T]` (T >= 1; T = 1 is a decode step).
            padding_mask: `[B, T]`, 1 for real tokens, 0 for pads; `None`
                means all real.
            state: an `RWKV6State` of batch B or 1, `None` for zeros, or
                the list of batch-B per-layer tuples `state.layers()` gives.
            contiguous: whether every row's real tokens are one run (no
                padding, or only left or right padding), as the caller
                knows it; `None` tests the mask (on torch a wait for the
                device, and no traced program can hold the test).

        Returns:
            `(hidden_states [B, T, hidden_dim], state)`, the state an
            `RWKV6State`, or a list like the one given. The list is the
            form a decoding loop carries: its steps then never restack the
            whole state (at batch 64, 1.6B, restacking took ~1.5 ms of a
            4.3 ms step).
        """
        token_ids = ops.convert_to_tensor(token_ids, "int32")
        if padding_mask is None:
            padding_mask = ops.ones_like(token_ids)
        padding_mask = ops.convert_to_tensor(padding_mask, "int32")
        # (An RWKV6State is a NamedTuple, so a tuple too.)
        as_list = not isinstance(state, RWKV6State) and state is not None
        if isinstance(state, RWKV6State):
            state = state.broadcast_to(ops.shape(token_ids)[0]).layers()
        hidden, layer_states = self._run_layers(
            token_ids, padding_mask, state, contiguous
        )
        if as_list:
            return hidden, layer_states
        return hidden, RWKV6State.from_layers(layer_states)

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """Keras's `quantize` over the projections, the embedding and the
        head (see `RWKV6CausalLM.quantize`)."""
        quantize_with_filter(super().quantize, mode, config, filters, kwargs)

    def load_weights(self, filepath, *args, **kwargs):
        """Keras's `load_weights`, with checks: an unreadable file or NaN
        weights raise `PresetLoadError` saying what to do."""
        load_checked(
            lambda path: super(RWKV6Backbone, self).load_weights(
                path, *args, **kwargs
            ),
            filepath,
            self.weights,
        )

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
                # `wkv_kernel` and `wkv_chunk_size` are choices of this
                # run, not of the model: a preset saved on a GPU loads on
                # a CPU.
                "tuned_state": self.tuned_state,
            }
        )
        if is_weight_only_int8(self):
            config["int8_weight_only"] = True
        policies = quantized_layer_policies(self)
        if policies:
            config["quantized_layers"] = policies
        return config
