"""Named presets: download one file from ModelScope, convert, cache.

`keras_hub.models.CausalLM.from_preset("rwkv6_world_1.6b")` resolves a
named preset through KerasHub's `preset_utils.get_file`. Our presets are
registered with KerasHub with a local cache directory as their handle; a
thin wrapper around `get_file` makes sure that directory exists first:

1. if `<cache>/<name>/config.json` exists, nothing touches the network;
2. otherwise only the preset's file(s) are fetched with the ModelScope SDK
   (`modelscope.hub.file_download.model_file_download`, which shows a
   progress bar) - never the whole repository, which holds every size;
3. the download is converted (`keras_rwkv.convert`) and written to a
   temporary directory that is renamed into place when complete, so an
   interrupted or failed run leaves no cache entry; the download itself is
   then deleted (set `KERAS_RWKV_KEEP_DOWNLOADS=1` to keep it).

The cache lives under the cache root (`settings.py`): by default
`~/.cache/keras_rwkv`, or `$KERAS_RWKV_CACHE`.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from importlib import resources

from keras_rwkv.utils import settings

KEEP_DOWNLOADS_ENV_VAR = "KERAS_RWKV_KEEP_DOWNLOADS"
MANIFEST_FILE = "rwkv6_world.json"


class PresetDownloadError(OSError):
    """A preset's files could not be fetched from ModelScope."""


def load_manifest():
    """The preset manifest shipped in `presets/` (name -> entry)."""
    try:  # installed: presets/ ships as the keras_rwkv.presets package
        text = (
            resources.files("keras_rwkv.presets")
            .joinpath(MANIFEST_FILE)
            .read_text(encoding="utf-8")
        )
    except ModuleNotFoundError:  # a source checkout put on sys.path
        here = os.path.dirname(os.path.abspath(__file__))
        path = os.path.join(here, "..", "..", "presets", MANIFEST_FILE)
        with open(path, encoding="utf-8") as f:
            text = f.read()
    return json.loads(text)["presets"]


MANIFEST = load_manifest()


def cache_root():
    return settings.cache_root()


def preset_dir(name):
    """Where the converted preset `name` lives (whether or not it does)."""
    return os.path.join(cache_root(), name)


def is_cached(name):
    return os.path.exists(os.path.join(preset_dir(name), "config.json"))


def unknown_preset_error(name):
    return ValueError(
        f"Unknown RWKV6 preset {name!r}. Available presets: "
        f"{', '.join(sorted(MANIFEST))}. A local preset directory (from "
        "`keras-rwkv convert`) or a 'modelscope://org/repo' handle of a "
        "KerasHub-format preset works too."
    )


@contextlib.contextmanager
def _lock(name):
    os.makedirs(cache_root(), exist_ok=True)
    path = os.path.join(cache_root(), f".{name}.lock")
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # one download per preset at a time
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download(model_id, file_name, local_dir):
    """Fetches one file of a ModelScope model repository."""
    from modelscope.hub import file_download

    try:
        return file_download.model_file_download(
            model_id=model_id, file_path=file_name, local_dir=local_dir
        )
    except Exception as e:
        raise PresetDownloadError(
            f"Could not download {file_name} from ModelScope model "
            f"{model_id} ({type(e).__name__}: {e}). Check your connection "
            "(or set MODELSCOPE_DOMAIN for a mirror), or load from a local "
            f"file instead: download {file_name} yourself, run "
            "`keras-rwkv convert FILE DIR`, then `from_preset(DIR)`."
        ) from e


def _check_sha256(path, expected):
    if not expected:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise PresetDownloadError(
            f"{path} does not have the expected sha256 ({expected}); the "
            "download is corrupt. It was deleted: load the preset again."
        )


def ensure_preset(name):
    """Makes sure the named preset is converted in the cache; returns its
    directory. Downloads and converts on first use only."""
    from keras_rwkv.convert import CheckpointError
    from keras_rwkv.convert import convert_checkpoint
    from keras_rwkv.convert import write_preset
    from keras_rwkv.models.rwkv6.rwkv6_causal_lm_preprocessor import (
        RWKV6CausalLMPreprocessor,
    )
    from keras_rwkv.models.rwkv6.rwkv6_tokenizer import RWKV6Tokenizer

    if name not in MANIFEST:
        raise unknown_preset_error(name)
    if is_cached(name):
        return preset_dir(name)
    with _lock(name):
        if is_cached(name):  # another process finished it meanwhile
            return preset_dir(name)
        source = MANIFEST[name]["source"]
        download_dir = os.path.join(cache_root(), "downloads", name)
        try:
            if source["format"] == "blinkdl_pth":
                path = _download(
                    source["modelscope_id"], source["file"], download_dir
                )
                _check_sha256(path, source.get("sha256"))
            else:  # a directory of files (bert4keras3 export)
                for file_name in source["files"]:
                    path = _download(
                        source["modelscope_id"], file_name, download_dir
                    )
                path = os.path.dirname(path)
            print(f"Converting {name} (once; cached in {preset_dir(name)})")
            backbone = convert_checkpoint(path)
            preprocessor = RWKV6CausalLMPreprocessor(RWKV6Tokenizer())
            write_preset([backbone, preprocessor], preset_dir(name))
        except (CheckpointError, PresetDownloadError) as e:
            # A broken download must not be reused by the next attempt.
            shutil.rmtree(download_dir, ignore_errors=True)
            if isinstance(e, CheckpointError):
                raise CheckpointError(
                    f"The downloaded file for preset {name!r} is not usable "
                    f"and was deleted ({e}). Loading the preset again "
                    "downloads it anew."
                ) from e
            raise
        if not os.environ.get(KEEP_DOWNLOADS_ENV_VAR):
            shutil.rmtree(download_dir, ignore_errors=True)
    return preset_dir(name)


def keras_hub_presets():
    """Our manifest in KerasHub's registry format; the handle is the local
    cache directory."""
    return {
        name: {
            "metadata": {
                "description": entry["description"],
                "params": entry["params"],
                "path": "rwkv6",
                "source": entry["source"],
            },
            "kaggle_handle": preset_dir(name),
        }
        for name, entry in MANIFEST.items()
    }


def install_keras_hub_hook():
    """Registers the presets with KerasHub and wraps its `get_file` so a
    named preset is fetched and converted before KerasHub reads it."""
    from keras_hub.src.utils import preset_utils

    from keras_rwkv.models.rwkv6.rwkv6_backbone import RWKV6Backbone

    preset_utils.register_presets(keras_hub_presets(), RWKV6Backbone)
    original = preset_utils.get_file
    if getattr(original, "_keras_rwkv", False):
        return

    def get_file(preset, path):
        if isinstance(preset, str) and preset in MANIFEST:
            # The cache root may have changed since import (env var).
            preset_utils.BUILTIN_PRESETS[preset]["kaggle_handle"] = (
                ensure_preset(preset)
            )
        elif (
            isinstance(preset, str)
            and preset.startswith("rwkv6")
            and "://" not in preset
            and not os.path.exists(preset)
            and preset not in preset_utils.BUILTIN_PRESETS
        ):
            raise unknown_preset_error(preset)
        return original(preset, path)

    get_file._keras_rwkv = True
    preset_utils.get_file = get_file
