"""RWKV6 for Keras 3 and KerasHub. Importing registers the classes and
the named presets with KerasHub.

In the `keras-rwkv` command line nothing is imported here at first: the
backend must be chosen before Keras is (see `entry.py`); the names below
then load on first use, and the command registers what it needs.
"""

import importlib

from keras_rwkv import entry

__version__ = "0.1.0"

_EXPORTS = {
    "RWKV6Backbone": "keras_rwkv.models.rwkv6.rwkv6_backbone",
    "RWKV6CausalLM": "keras_rwkv.models.rwkv6.rwkv6_causal_lm",
    "RWKV6CausalLMPreprocessor": (
        "keras_rwkv.models.rwkv6.rwkv6_causal_lm_preprocessor"
    ),
    "RWKV6State": "keras_rwkv.models.rwkv6.rwkv6_state",
    "RWKV6StreamDecoder": "keras_rwkv.models.rwkv6.rwkv6_stream_decoder",
    "RWKV6Tokenizer": "keras_rwkv.models.rwkv6.rwkv6_tokenizer",
    "wkv6": "keras_rwkv.ops.wkv6",
}

__all__ = [*_EXPORTS, "register", "samplers", "__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name == "samplers":
        return importlib.import_module("keras_rwkv.samplers")
    raise AttributeError(f"module 'keras_rwkv' has no attribute {name!r}")


def register():
    """Imports the classes (registering them with Keras serialization),
    registers the named presets with KerasHub, and turns on the persistent
    compilation cache (see `keras_rwkv.utils.compile_cache`). Idempotent;
    importing `keras_rwkv` calls it, outside the command line.

    Returns:
        The compilation cache directory in use, or None.
    """
    from keras_rwkv import keras_hub_shim
    from keras_rwkv.utils import compile_cache

    for name in _EXPORTS:
        __getattr__(name)
    importlib.import_module("keras_rwkv.samplers")
    keras_hub_shim.install()
    return compile_cache.enable()


if not entry.prepare_cli_process():
    register()
