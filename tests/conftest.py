import os
import shutil
import tempfile

# The suite runs on JAX unless KERAS_BACKEND says otherwise (CI runs a
# second pass on torch). Must be set before keras is imported.
os.environ.setdefault("KERAS_BACKEND", "jax")
# BlinkDL's `rwkv` reads these at import time.
os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The package's own compilation cache stays off: its tests start processes
# with a user's environment (no KERAS_ or JAX_ variables). Instead one run
# (its xdist workers and the processes tests start inherit this) shares a
# JAX cache of its own, removed at the end: many tests build the same
# small models and would compile the same programs again
# (tests/test_generate.py alone: 76 s without, 61 s with).
os.environ.setdefault("KERAS_RWKV_COMPILATION_CACHE", "0")
_RUN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _RUN_CACHE = tempfile.mkdtemp(prefix="keras_rwkv_tests_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _RUN_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import keras  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    # CI runs the suite once per backend; what no backend touches (C++ and
    # CUDA builds, the host emulation of the kernels) runs in the JAX pass.
    if keras.config.backend() == "jax":
        return
    skip = pytest.mark.skip(reason="backend-independent: runs in the JAX pass")
    for item in items:
        if item.get_closest_marker("backend_independent"):
            item.add_marker(skip)


def pytest_sessionfinish(session):
    if _RUN_CACHE is not None:  # the process that made it
        shutil.rmtree(_RUN_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")
    keras.backend.clear_session()
