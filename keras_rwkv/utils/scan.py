"""`keras.ops.associative_scan` that stays on its inputs' device."""

import contextlib

import keras
from keras import ops


def associative_scan(f, elems, axis=0):
    """`ops.associative_scan(f, elems, axis=axis)`.

    Keras's torch version makes its scratch buffers with `torch.zeros` on
    the default device (the CPU) and mixes them with `elems`, so on a GPU
    the scan ran on the host and each use of its result was a copy to the
    device and a wait for it. Here `elems`' device is the default while it
    runs."""
    with _default_device(keras.tree.flatten(elems)[0]):
        return ops.associative_scan(f, elems, axis=axis)


def _default_device(x):
    if keras.config.backend() != "torch" or not hasattr(x, "device"):
        return contextlib.nullcontext()  # or symbolic
    import torch

    return torch.device(x.device)
