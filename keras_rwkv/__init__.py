"""RWKV6 for Keras 3 and KerasHub. Importing registers the classes."""

from keras_rwkv import samplers
from keras_rwkv.models.rwkv6.rwkv6_backbone import RWKV6Backbone
from keras_rwkv.models.rwkv6.rwkv6_causal_lm import RWKV6CausalLM
from keras_rwkv.models.rwkv6.rwkv6_causal_lm_preprocessor import (
    RWKV6CausalLMPreprocessor,
)
from keras_rwkv.models.rwkv6.rwkv6_state import RWKV6State
from keras_rwkv.models.rwkv6.rwkv6_stream_decoder import RWKV6StreamDecoder
from keras_rwkv.models.rwkv6.rwkv6_tokenizer import RWKV6Tokenizer
from keras_rwkv.ops.wkv6 import wkv6
from keras_rwkv.utils.preset_cache import install_keras_hub_hook

__version__ = "0.1.0"

# Named presets (rwkv6_world_1.6b, ...) become loadable through KerasHub.
install_keras_hub_hook()

__all__ = [
    "RWKV6Backbone",
    "RWKV6CausalLM",
    "RWKV6CausalLMPreprocessor",
    "RWKV6State",
    "RWKV6StreamDecoder",
    "RWKV6Tokenizer",
    "samplers",
    "wkv6",
    "__version__",
]
