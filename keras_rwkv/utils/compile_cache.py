"""JAX's persistent compilation cache, on by default.

Every new process would compile generate's programs again (about 30 s for
the 1.6B on an H200, seconds for a toy model on a CPU). With JAX's
persistent cache they are compiled once and loaded from disk after that:
`<cache root>/jax_compilation_cache` (see `settings.py`), every program,
small ones included: loading a model runs one small random-initializer
program per weight shape, ~65 ms each to compile on a CPU (more on a GPU),
most of a small model's load time. JAX keeps the cache under `MAX_BYTES`,
dropping the least recently used entries. A cache directory already
configured for JAX (`JAX_COMPILATION_CACHE_DIR`, `jax.config`) is used as
it is; `KERAS_RWKV_COMPILATION_CACHE=0` leaves the cache off.

The torch and TensorFlow paths compile nothing ahead of time, so there is
nothing to keep for them.
"""

import os

from keras_rwkv.utils import settings

MAX_BYTES = 4 << 30
_EVENTS = {
    "/jax/compilation_cache/cache_hits": "loaded",
    "/jax/compilation_cache/cache_misses": "compiled",
}
_counts = {"loaded": 0, "compiled": 0}
_listening = False


def counts():
    """`{"loaded": n, "compiled": m}`: programs this process took from the
    cache, and compiled for lack of an entry, since `enable`; None when
    the cache is off."""
    return dict(_counts) if _listening else None


def _count(event, **kwargs):
    if event in _EVENTS:
        _counts[_EVENTS[event]] += 1


def directory():
    """Where JAX's cache goes when we set it."""
    return os.path.join(settings.cache_root(), "jax_compilation_cache")


def enable():
    """Turns the cache on for this process (JAX backend only).

    Returns:
        The cache directory in use, or None when off.
    """
    import keras

    if keras.config.backend() != "jax":
        return None
    import jax

    global _listening
    path = jax.config.jax_compilation_cache_dir  # the user's own, if set
    if not path and not settings.flag(settings.COMPILATION_CACHE_ENV_VAR):
        return None
    if not _listening:
        jax.monitoring.register_event_listener(_count)
        _listening = True
    if path:
        return path
    path = directory()
    jax.config.update("jax_compilation_cache_dir", path)
    # JAX's defaults: programs compiled in under 1 s are not kept, and the
    # cache is unbounded.
    if jax.config.jax_persistent_cache_min_compile_time_secs == 1.0:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if jax.config.jax_compilation_cache_max_size == -1:
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path
