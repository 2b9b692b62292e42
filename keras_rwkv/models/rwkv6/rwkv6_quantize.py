"""Which layers `quantize` touches in an RWKV6 model.

Keras quantizes layer by layer. RWKV6 quantizes its projections (every
`Dense`: receptance, key, value, gate and output of TimeMix, the three of
ChannelMix) and, in int8, the embedding and the head (the
`ReversibleEmbedding`). Nothing else: the WKV recurrence, the decay and
its LoRA, the token-shift mixes and every norm keep their dtype, so the
state stays exact float32.

int4 leaves the embedding and head as they are: Keras 3.15 reloads an
int4 `ReversibleEmbedding` with an activation quantizer it did not have
when it was quantized, so a saved model would not give the logits it gave
before saving (0.7% of the largest logit apart on a tiny model). float8
has no embedding form in Keras.

Weight-only int8 (`Int8QuantizationConfig(activation_quantizer=None)`)
is the form a decoding step reads fastest; Keras's default int8 also
quantizes every layer's input, which makes a step slower than bfloat16
(benchmarks/RESULTS.md). Keras 3.15 saves an int8 layer's dtype policy but
not its config, and our layers build their `Dense` themselves, so a saved
weight-only model would reload with input quantizers: the backbone says
`int8_weight_only` in its config instead, and drops them again on load.

KerasHub 0.32's `Backbone.from_preset` builds a backbone with the dtype
the caller passes, `None` by default, in place of the saved one (only a
task's `from_preset` keeps a saved `DTypePolicyMap`), so a quantized
backbone saved on its own would rebuild in float and fail to load its
int8 weights. The backbone's config also lists its quantized layers'
policies (`quantized_layers`), and a backbone given no policy map builds
with them.

Keras checks `type(layer) is Dense` unless told not to (`type_check`);
KerasHub's `ReversibleEmbedding` subclasses Keras's, so the filter below
picks the layers and the type check is off.
"""

import copy
import re

import keras

QUANTIZED_LAYERS = {
    "int8": (
        keras.layers.Dense,
        keras.layers.EinsumDense,
        keras.layers.Embedding,
    ),
    "int4": (keras.layers.Dense, keras.layers.EinsumDense),
    "float8": (keras.layers.Dense, keras.layers.EinsumDense),
}


def _matches(layer, filters):
    # Keras's own semantics: a regex on the layer name, a list of them, or
    # a callable.
    if filters is None:
        return True
    if isinstance(filters, str):
        return bool(re.search(filters, layer.name))
    if isinstance(filters, (list, tuple)):
        return any(re.search(pattern, layer.name) for pattern in filters)
    return bool(filters(layer))


def quantize_with_filter(quantize, mode, config, filters, kwargs):
    """Calls Keras's `Model.quantize` (`quantize`, unbound from the
    model) on the layers RWKV6 quantizes in `mode`.

    Modes with a calibration pass of their own (`gptq`, `awq`) go to
    Keras unchanged."""
    kinds = QUANTIZED_LAYERS.get(mode)
    if kinds is None:
        return quantize(mode, config=config, filters=filters, **kwargs)
    kwargs.pop("type_check", None)  # `keep` does the type check
    embedding_config = _embedding_config(mode, config)
    if embedding_config is not config:
        # An int8 config's weight quantizer is a Dense kernel's (per output
        # column, axis 0); the embedding table needs per row (axis -1).
        def embeddings(layer):
            return isinstance(layer, keras.layers.Embedding) and _matches(
                layer, filters
            )

        quantize(
            mode,
            config=embedding_config,
            filters=embeddings,
            type_check=False,
            **kwargs,
        )
        kinds = tuple(k for k in kinds if k is not keras.layers.Embedding)

    def keep(layer):
        return isinstance(layer, kinds) and _matches(layer, filters)

    return quantize(
        mode, config=config, filters=keep, type_check=False, **kwargs
    )


def _embedding_config(mode, config):
    """`config` for the embedding: the same, but per row where an int8
    config quantizes weights per column."""
    from keras.quantizers import Int8QuantizationConfig

    if mode != "int8" or not isinstance(config, Int8QuantizationConfig):
        return config
    weights = config.weight_quantizer
    if weights is None:
        return config
    # No weight quantizer: Keras then picks its defaults per matrix (per
    # row for the table, per column for an untied head), where one given
    # quantizer would serve both and fail on one.
    return Int8QuantizationConfig(
        weight_quantizer=None,
        activation_quantizer=config.activation_quantizer,
    )


def _int8_layers(model):
    """The int8 layers that may quantize their input."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if layer.quantization_mode == "int8"
        and hasattr(layer, "inputs_quantizer")
    ]


def is_weight_only_int8(model):
    """Whether `model` has int8 layers and none quantizes its input."""
    layers = _int8_layers(model)
    return bool(layers) and not any(x.inputs_quantizer for x in layers)


def drop_int8_input_quantizers(model):
    """Makes every int8 layer of `model` weight-only, as it was saved."""
    for layer in _int8_layers(model):
        layer.inputs_quantizer = None


def quantized_layer_policies(model):
    """`{layer path: serialized dtype policy}` of `model`'s quantized
    layers, for its config; None when none is quantized."""
    policies = {
        layer.path: keras.dtype_policies.serialize(layer.dtype_policy)
        for layer in model._flatten_layers(include_self=False)
        if layer.quantization_mode is not None
    }
    return policies or None


def with_quantized_layers(dtype, policies):
    """The dtype a model saved with quantized layer `policies` builds with:
    `dtype` as it is when it is already a policy map (a task's
    `from_preset` passes the saved one), else a map of `policies` over
    `dtype` (a float dtype the caller asks for becomes their source)."""
    if not policies or isinstance(dtype, keras.dtype_policies.DTypePolicyMap):
        return dtype
    default = None if dtype is None else keras.dtype_policies.get(dtype)
    policy_map = keras.dtype_policies.DTypePolicyMap(default_policy=default)
    for path, policy in policies.items():
        policy = copy.deepcopy(policy)
        if default is not None:
            policy["config"]["source_name"] = default.name
        policy_map[path] = keras.dtype_policies.deserialize(policy)
    return policy_map
