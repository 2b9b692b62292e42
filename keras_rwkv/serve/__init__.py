"""`keras-rwkv serve`: an OpenAI-compatible server with continuous
batching and a state cache (`pip install keras-rwkv[serve]`)."""

from keras_rwkv.serve.engine import Engine
from keras_rwkv.serve.engine import Job
from keras_rwkv.serve.protocol import Sampling
from keras_rwkv.serve.protocol import make_sampler


def create_app(*args, **kwargs):
    """See `keras_rwkv.serve.app.create_app` (imports Starlette)."""
    from keras_rwkv.serve.app import create_app as create

    return create(*args, **kwargs)


__all__ = ["Engine", "Job", "Sampling", "create_app", "make_sampler"]
