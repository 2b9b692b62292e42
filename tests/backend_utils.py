"""Gradients on whichever Keras backend the suite runs on."""

import keras
import numpy as np


def value_and_grad(fn, args):
    """`fn(*args) -> scalar`; returns (value, [grad per arg]) as numpy."""
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        value, grads = jax.value_and_grad(fn, argnums=tuple(range(len(args))))(
            *[jax.numpy.asarray(a) for a in args]
        )
        return np.asarray(value), [np.asarray(g) for g in grads]
    if backend == "torch":
        import torch

        ts = [torch.tensor(a, requires_grad=True) for a in args]
        value = fn(*ts)
        grads = torch.autograd.grad(value, ts, allow_unused=True)
        grads = [
            torch.zeros_like(t) if g is None else g for g, t in zip(grads, ts)
        ]
        return value.detach().numpy(), [g.detach().numpy() for g in grads]
    if backend == "tensorflow":
        import tensorflow as tf

        ts = [tf.Variable(a) for a in args]
        with tf.GradientTape() as tape:
            value = fn(*ts)
        grads = tape.gradient(value, ts)
        grads = [
            tf.zeros_like(t) if g is None else g for g, t in zip(grads, ts)
        ]
        return value.numpy(), [g.numpy() for g in grads]
    raise NotImplementedError(backend)
