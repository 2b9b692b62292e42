"""The one place keras-rwkv reaches into KerasHub's private code.

KerasHub has no public API for a plugin's named presets, nor for fetching
a preset's files on first use. Two of its internals
(`keras_hub.src.utils.preset_utils`) do that here:
- `register_presets(presets, backbone_cls)` lists our presets (so
  `RWKV6Backbone.presets`, `CausalLM.from_preset("rwkv6_world_1.6b")`
  and `keras_hub.models.CausalLM.presets` know them), with the local
  cache directory as their handle;
- `get_file(preset, path)`, which every preset file read goes through, is
  wrapped so that a named preset, or an `hf://` handle of an RWKV6
  repository in a Hugging Face layout, is downloaded and converted
  (`keras_rwkv.convert.preset_cache.prepare`) and read from the cache,
  and a damaged JSON file says what to do.

Tested against the KerasHub versions pyproject.toml admits
(`TESTED_KERAS_HUB`). On another version the names are checked first:
if one is missing or has changed shape, importing keras_rwkv raises
`KerasHubIncompatible` naming the version, instead of presets failing
later in a way nobody can trace.
"""

import inspect
import sys

TESTED_KERAS_HUB = ">=0.32,<0.33"
# name: the parameters it must take (None: not a function).
_NEEDED = {
    "register_presets": ("presets", "backbone_cls"),
    "get_file": ("preset", "path"),
    "BUILTIN_PRESETS": None,
}


class KerasHubIncompatible(ImportError):
    """The installed KerasHub lacks the internals the preset hook uses."""


def _preset_utils():
    import keras_hub

    version = getattr(keras_hub, "__version__", "unknown")
    try:
        from keras_hub.src.utils import preset_utils
    except ImportError as e:
        problem = f"keras_hub.src.utils.preset_utils cannot be imported ({e})"
    else:
        problem = _check(preset_utils)
        if problem is None:
            return preset_utils
    raise KerasHubIncompatible(
        f"keras-rwkv needs keras-hub {TESTED_KERAS_HUB}; keras-hub "
        f"{version} is installed and {problem}. Run: pip install "
        f"'keras-hub{TESTED_KERAS_HUB}'"
    )


def _check(module):
    for name, params in _NEEDED.items():
        value = getattr(module, name, None)
        if value is None:
            return f"has no preset_utils.{name}"
        if params is None:
            if not isinstance(value, dict):
                return f"its preset_utils.{name} is not a dict"
            continue
        try:
            have = tuple(inspect.signature(value).parameters)
        except (TypeError, ValueError):
            return f"its preset_utils.{name} cannot be inspected"
        if have[: len(params)] != params:
            return f"its preset_utils.{name} takes {have}, not {params}"
    return None


def install():
    """Registers the presets and wraps `get_file` (idempotent)."""
    from keras_rwkv.convert import preset_cache
    from keras_rwkv.models.rwkv6.rwkv6_backbone import RWKV6Backbone

    preset_utils = _preset_utils()
    preset_utils.register_presets(
        preset_cache.keras_hub_presets(), RWKV6Backbone
    )
    original = preset_utils.get_file
    if getattr(original, "_keras_rwkv", False):
        return

    def get_file(preset, path):
        # A named preset or an RWKV6 hf:// repository is read from its
        # converted directory in our cache.
        local_dir = preset_cache.prepare(preset, preset_utils.BUILTIN_PRESETS)
        local = original(preset if local_dir is None else local_dir, path)
        if isinstance(local, str) and local.endswith(".json"):
            preset_cache.check_json(local)
        return local

    get_file._keras_rwkv = True
    preset_utils.get_file = get_file
    # Modules that imported the name itself (the tokenizer's asset loader)
    # would bypass the wrapper.
    for name, module in list(sys.modules.items()):
        if name.startswith("keras_hub.src") and (
            getattr(module, "get_file", None) is original
        ):
            module.get_file = get_file


def lora_layer_count(backbone):
    """How many layers KerasHub's `Backbone.enable_lora` has given LoRA
    (its private record; 0 if this KerasHub keeps none). Read to notice
    LoRA added to a model whose compiled programs hold its variables."""
    return len(getattr(backbone, "_lora_enabled_layers", None) or ())
