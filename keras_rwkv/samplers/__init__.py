"""Samplers for RWKV generation (KerasHub `Sampler` subclasses)."""

from keras_rwkv.samplers.penalty_sampler import PenaltySampler

__all__ = ["PenaltySampler"]
