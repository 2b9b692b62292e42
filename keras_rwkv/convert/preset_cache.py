"""Named presets: download one file from ModelScope, convert, cache.

`keras_hub.models.CausalLM.from_preset("rwkv6_world_1.6b")` resolves a
named preset through KerasHub's `preset_utils.get_file`. Our presets are
registered with KerasHub with a local cache directory as their handle
(`keras_rwkv/keras_hub_shim.py`, the one place that touches KerasHub's
internals); before KerasHub reads a named preset, `ensure_preset` makes
sure that directory exists:

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
import hashlib
import json
import os
import shutil
import sys
from importlib import resources

from keras_rwkv.utils import settings
from keras_rwkv.utils.files import file_lock
from keras_rwkv.utils.modelscope_download import PresetDownloadError
from keras_rwkv.utils.modelscope_download import check_disk_space
from keras_rwkv.utils.modelscope_download import check_reachable
from keras_rwkv.utils.modelscope_download import download
from keras_rwkv.utils.modelscope_download import gigabytes
from keras_rwkv.utils.modelscope_download import hub_host

MANIFEST_FILE = "rwkv6_world.json"


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


def _lock(name):
    """One download of a preset at a time, across processes."""
    return file_lock(os.path.join(cache_root(), f".{name}.lock"))


def _make_dirs(path):
    """`os.makedirs`; returns the directories it created, innermost
    first."""
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        os.makedirs(directory, exist_ok=True)
    return missing


def _remove_empty_dirs(paths):
    for path in paths:
        with contextlib.suppress(OSError):
            os.rmdir(path)  # only when empty


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
    if name not in MANIFEST:
        raise unknown_preset_error(name)
    if is_cached(name):
        return preset_dir(name)
    created = _make_dirs(cache_root())
    try:
        with _lock(name):
            if not is_cached(name):  # or another process finished it
                _fetch_and_convert(name)
    finally:
        # A failed attempt leaves nothing: no lock file, no empty dirs.
        _remove_empty_dirs([os.path.join(cache_root(), "downloads"), *created])
    return preset_dir(name)


def _fetch_and_convert(name):
    from keras_rwkv.convert import CheckpointError
    from keras_rwkv.convert import convert_checkpoint
    from keras_rwkv.convert import write_preset
    from keras_rwkv.models.rwkv6.rwkv6_causal_lm_preprocessor import (
        RWKV6CausalLMPreprocessor,
    )
    from keras_rwkv.models.rwkv6.rwkv6_tokenizer import RWKV6Tokenizer

    entry = MANIFEST[name]
    source = entry["source"]
    files = [source["file"]] if "file" in source else source["files"]
    size = 2 * entry["params"]  # World checkpoints are bfloat16
    # The download and the converted preset, side by side.
    check_disk_space(cache_root(), 2 * size, f"preset {name!r}")
    check_reachable(hub_host())
    print(
        f"Downloading preset {name} ({', '.join(files)}, about "
        f"{gigabytes(size)}) from ModelScope {source['modelscope_id']}; it "
        f"is converted once and cached in {preset_dir(name)}.",
        file=sys.stderr,
    )
    download_dir = os.path.join(cache_root(), "downloads", name)
    try:
        for file_name in files:
            path = download(source["modelscope_id"], file_name, download_dir)
        if source["format"] == "blinkdl_pth":
            _check_sha256(path, source.get("sha256"))
        else:  # a directory of files (bert4keras3 export)
            path = os.path.dirname(path)
        print(f"Converting {name} (once).", file=sys.stderr)
        backbone = convert_checkpoint(path)
        preprocessor = RWKV6CausalLMPreprocessor(RWKV6Tokenizer())
        # Replaces an incomplete entry (no config.json) of ours, if any.
        write_preset([backbone, preprocessor], preset_dir(name), overwrite=True)
    except CheckpointError as e:
        raise CheckpointError(
            f"The downloaded file for preset {name!r} is not usable and "
            f"was deleted ({e}). Loading the preset again downloads it anew."
        ) from e
    finally:
        # A broken download must not be reused by the next attempt, and a
        # good one is not needed once converted.
        if not (settings.keep_downloads() and is_cached(name)):
            shutil.rmtree(download_dir, ignore_errors=True)


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


def prepare(preset, registered=()):
    """Called before KerasHub reads any file of `preset`: returns the
    converted directory of a named preset (fetched and converted first if
    needed), or None for anything else.

    Raises:
        ValueError: `preset` looks like a misspelt RWKV6 preset name (it
            starts with "rwkv6", is not a path, a handle or one of
            `registered`), saying which names exist.
    """
    if not isinstance(preset, str):
        return None
    if preset in MANIFEST:
        return ensure_preset(preset)
    if (
        preset.startswith("rwkv6")
        and "://" not in preset
        and not os.path.exists(preset)
        and preset not in registered
    ):
        raise unknown_preset_error(preset)
    return None


def check_json(path):
    """A preset's JSON file that does not parse names itself and says
    what to do (KerasHub would show a bare JSONDecodeError)."""
    from keras_rwkv.models.rwkv6.rwkv6_weight_checks import PresetLoadError
    from keras_rwkv.models.rwkv6.rwkv6_weight_checks import remedy

    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PresetLoadError(
            f"{path} cannot be read ({type(e).__name__}: {e}); the preset "
            f"is damaged or incomplete.\n{remedy(path)}"
        ) from None
