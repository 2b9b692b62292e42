"""Settings read from the environment, in one place.

docs/settings.md has the table of every `KERAS_RWKV_*` variable (a test
keeps it complete). Here: the cache root, and `flag()`, which the on/off
switches use:

- `KERAS_RWKV_CACHE`: the cache root (converted presets, CUDA kernel
  builds, JAX's compilation cache). Default `$XDG_CACHE_HOME/keras_rwkv`,
  or `~/.cache/keras_rwkv`. `KERAS_RWKV_CACHE_DIR`, its older name, is
  still honoured.
- `KERAS_RWKV_COMPILATION_CACHE=0`: do not turn on JAX's persistent
  compilation cache (see `compile_cache.py`).
"""

import os

CACHE_ENV_VARS = ("KERAS_RWKV_CACHE", "KERAS_RWKV_CACHE_DIR")
COMPILATION_CACHE_ENV_VAR = "KERAS_RWKV_COMPILATION_CACHE"
FALSE_WORDS = ("0", "false", "no", "off")


def cache_root():
    """The absolute cache root (not created)."""
    for name in CACHE_ENV_VARS:
        if os.environ.get(name):
            return os.path.abspath(os.path.expanduser(os.environ[name]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return os.path.abspath(os.path.join(base, "keras_rwkv"))


def flag(name, default=True):
    """A boolean environment switch: unset gives `default`; "0", "false",
    "no" and "off" (any case) are False, anything else True."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    return value not in FALSE_WORDS
