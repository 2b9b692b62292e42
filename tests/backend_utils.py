"""Gradients on whichever Keras backend the suite runs on."""

import keras
import numpy as np


def compiled(fn):
    """`fn` under `jax.jit` on JAX (eager JAX compiles every op on its own,
    seconds for a WKV6 call); `fn` itself elsewhere."""
    if keras.config.backend() == "jax":
        import jax

        return jax.jit(fn)
    return fn


def value_and_grad(fn, args, jit=False):
    """`fn(*args) -> scalar`; returns (value, [grad per arg]) as numpy.
    `jit=True` compiles the gradient function on JAX."""
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        grad_fn = jax.value_and_grad(fn, argnums=tuple(range(len(args))))
        grad_fn = jax.jit(grad_fn) if jit else grad_fn
        value, grads = grad_fn(*[jax.numpy.asarray(a) for a in args])
        return np.asarray(value), [np.asarray(g) for g in grads]
    if backend == "torch":
        import torch

        # Leaves on Keras's device (the GPU when there is one): ops that
        # only cast keep a tensor where it is, and would mix devices.
        ts = [
            keras.ops.convert_to_tensor(a).detach().requires_grad_()
            for a in args
        ]
        value = fn(*ts)
        grads = torch.autograd.grad(value, ts, allow_unused=True)
        grads = [
            torch.zeros_like(t) if g is None else g for g, t in zip(grads, ts)
        ]
        return value.detach().cpu().numpy(), [
            g.detach().cpu().numpy() for g in grads
        ]
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
