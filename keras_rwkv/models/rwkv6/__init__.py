from keras_rwkv.models.rwkv6.rwkv6_backbone import RWKV6Backbone
from keras_rwkv.models.rwkv6.rwkv6_causal_lm import RWKV6CausalLM
from keras_rwkv.models.rwkv6.rwkv6_causal_lm_preprocessor import (
    RWKV6CausalLMPreprocessor,
)
from keras_rwkv.models.rwkv6.rwkv6_state import RWKV6State
from keras_rwkv.models.rwkv6.rwkv6_tokenizer import RWKV6Tokenizer

__all__ = [
    "RWKV6Backbone",
    "RWKV6CausalLM",
    "RWKV6CausalLMPreprocessor",
    "RWKV6State",
    "RWKV6Tokenizer",
]
