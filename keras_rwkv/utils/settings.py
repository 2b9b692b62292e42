"""Settings read from the environment, in one place.

Every environment variable keras-rwkv reads is read here (the command
line's backend choice in `entry.py` aside, which follows Keras's own
`KERAS_BACKEND`). docs/settings.md has the table (a test keeps it
complete):

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


def _choice(name, choices, default):
    """The value of environment variable `name`, lowercased: one of
    `choices`, `default` when unset, else an error naming them."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in choices:
        raise ValueError(f"{name}={value!r}: use one of {', '.join(choices)}.")
    return value


STEP_KERNEL_ENV_VAR = "KERAS_RWKV_STEP_KERNEL"
STEP_KERNELS = ("auto", "cuda", "xla")


def step_kernel():
    """`KERAS_RWKV_STEP_KERNEL`: whether a decoding step runs its own CUDA
    kernels (`keras_rwkv.ops.matvec`: the products and the fused pieces):
    "auto" (where they run), "cuda" (them, or an error saying why not) or
    "xla"."""
    return _choice(STEP_KERNEL_ENV_VAR, STEP_KERNELS, "auto")


TORCH_STEP_MODE_ENV_VAR = "KERAS_RWKV_TORCH_STEP_MODE"
TORCH_STEP_MODES = (
    "default",
    "reduce-overhead",
    "max-autotune",
    "max-autotune-no-cudagraphs",
)


def torch_step_mode(on_gpu):
    """`KERAS_RWKV_TORCH_STEP_MODE`: torch.compile's mode for the compiled
    torch decoding step, named as torch names them; by default a CUDA
    graph ("reduce-overhead") on a GPU, else "default"."""
    default = "reduce-overhead" if on_gpu else "default"
    return _choice(TORCH_STEP_MODE_ENV_VAR, TORCH_STEP_MODES, default)


TORCH_TRAIN_MODE_ENV_VAR = "KERAS_RWKV_TORCH_TRAIN_MODE"
TORCH_TRAIN_MODES = ("trace",) + TORCH_STEP_MODES


def torch_train_mode(on_gpu):
    """`KERAS_RWKV_TORCH_TRAIN_MODE`: how torch with `jit_compile=True`
    runs the forward pass of `fit`, `evaluate` and `predict`: "trace"
    (the traced graph as it is; the default on a CPU, where compiling
    takes minutes) or a torch.compile mode ("reduce-overhead", its CUDA
    graphs, on a GPU)."""
    default = "reduce-overhead" if on_gpu else "trace"
    return _choice(TORCH_TRAIN_MODE_ENV_VAR, TORCH_TRAIN_MODES, default)


PRESET_HUB_ENV_VAR = "KERAS_RWKV_PRESET_HUB"
PRESET_HUBS = ("modelscope", "huggingface")


def preset_hub():
    """`KERAS_RWKV_PRESET_HUB`: the hub named presets are fetched from
    ("modelscope" or "huggingface"), or None (ModelScope, else Hugging
    Face when ModelScope cannot be reached)."""
    return _choice(PRESET_HUB_ENV_VAR, PRESET_HUBS, None)


KEEP_DOWNLOADS_ENV_VAR = "KERAS_RWKV_KEEP_DOWNLOADS"
WKV_KERNEL_ENV_VAR = "KERAS_RWKV_WKV_KERNEL"
WKV_SEGMENTS_ENV_VAR = "KERAS_RWKV_WKV6_SEGMENTS"
STEP_ROWS_ENV_VAR = "KERAS_RWKV_STEP_ROWS"
CUDA_ROOT_ENV_VARS = ("CUDA_HOME", "CUDA_PATH")


def keep_downloads():
    """`KERAS_RWKV_KEEP_DOWNLOADS=1`: keep a checkpoint after converting."""
    return flag(KEEP_DOWNLOADS_ENV_VAR, default=False)


def wkv_kernel_override(choices):
    """`KERAS_RWKV_WKV_KERNEL`: one of `choices`, or None when unset."""
    value = os.environ.get(WKV_KERNEL_ENV_VAR, "").strip().lower()
    if not value:
        return None
    if value not in choices:
        raise ValueError(
            f"{WKV_KERNEL_ENV_VAR}={value!r} is not a WKV kernel. Use one "
            f"of {', '.join(choices)}."
        )
    return value


def _positive_int(name, what):
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(
            f"{name}={value!r}: expected a positive integer ({what})."
        )
    return int(value)


def wkv_segments():
    """`KERAS_RWKV_WKV6_SEGMENTS`: forced time-segment count, or None."""
    return _positive_int(WKV_SEGMENTS_ENV_VAR, "1 turns the split off")


WKV6_COLS_ENV_VAR = "KERAS_RWKV_WKV6_COLS"
WKV6_GROUPS_ENV_VAR = "KERAS_RWKV_WKV6_GROUPS"
WKV6_FORM_ENV_VAR = "KERAS_RWKV_WKV6_FORM"
# The CUDA kernels' forms, as their `Form` numbers them.
WKV6_FORMS = {"auto": 0, "step": 1, "parallel": 2}


def wkv6_launch():
    """The CUDA WKV kernel's forced launch choices, for benchmarks and
    tests, as the kernels' `Params` take them (0: the kernel's own
    choice): `KERAS_RWKV_WKV6_COLS` (1, 2 or 4),
    `KERAS_RWKV_WKV6_GROUPS` (1, 2, 4 or 8) and the kernels' form,
    forward and backward, `KERAS_RWKV_WKV6_FORM` ("auto", "step" or
    "parallel", see docs/cuda_kernel.md). Read at each call (trace time
    under `jit`), so a setting changed between calls takes effect.

    Returns:
        A dict with int entries `cols`, `groups` and `form`.
    """
    cols = _choice(WKV6_COLS_ENV_VAR, ("1", "2", "4"), "0")
    groups = _choice(WKV6_GROUPS_ENV_VAR, ("1", "2", "4", "8"), "0")
    form = _choice(WKV6_FORM_ENV_VAR, tuple(WKV6_FORMS), "auto")
    return {
        "cols": int(cols),
        "groups": int(groups),
        "form": WKV6_FORMS[form],
    }


def step_rows():
    """`KERAS_RWKV_STEP_ROWS`: forced rows of a batch-1 step, or None."""
    return _positive_int(
        STEP_ROWS_ENV_VAR, "1 turns the padding of batch-1 steps off"
    )


def cuda_roots():
    """The CUDA toolkit roots the environment names (`CUDA_HOME`, then
    `CUDA_PATH`), for finding nvcc."""
    return [os.environ[n] for n in CUDA_ROOT_ENV_VARS if os.environ.get(n)]
