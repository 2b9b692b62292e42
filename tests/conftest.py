import os

# The suite runs on JAX unless KERAS_BACKEND says otherwise (CI runs a
# second pass on torch). Must be set before keras is imported.
os.environ.setdefault("KERAS_BACKEND", "jax")
# BlinkDL's `rwkv` reads these at import time.
os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Tests compile in clean processes; the cache has tests of its own.
os.environ.setdefault("KERAS_RWKV_COMPILATION_CACHE", "0")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")
    keras.backend.clear_session()
