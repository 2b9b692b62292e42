from keras_rwkv.models.rwkv6.rwkv6_backbone import RWKV6Backbone
from keras_rwkv.models.rwkv6.rwkv6_state import RWKV6State

__all__ = ["RWKV6Backbone", "RWKV6State"]
