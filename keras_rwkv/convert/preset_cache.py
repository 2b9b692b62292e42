"""Presets converted once and cached.

Two kinds of preset are downloaded, converted and kept in the cache:
- named presets (`keras_hub.models.CausalLM.from_preset("rwkv6_world_1.6b")`,
  the manifest in `presets/`), from ModelScope (BlinkDL's `.pth`, or the
  bert4keras3 export) or from Hugging Face where the manifest lists a
  repository too;
- `hf://org/repo` handles of RWKV6 repositories in a Hugging Face layout
  (transformers' or fla's, `convert/huggingface.py`); an `hf://` handle of
  a KerasHub-format preset is left to KerasHub's own loader.

KerasHub resolves both through `preset_utils.get_file`, which
`keras_rwkv/keras_hub_shim.py` (the one place that touches KerasHub's
internals) wraps with `prepare`:

1. if the converted preset is in the cache, nothing touches the network;
2. otherwise only the needed files are fetched (`utils/hub_download.py`:
   one `.pth` of BlinkDL's repository, which holds every size; or
   `config.json` and the weights of a Hugging Face repository), never a
   whole repository;
3. the download is converted (`keras_rwkv.convert`) and written to a
   temporary directory that is renamed into place when complete, so an
   interrupted or failed run leaves no cache entry; the download itself is
   then deleted (set `KERAS_RWKV_KEEP_DOWNLOADS=1` to keep it).

The cache lives under the cache root (`settings.py`): by default
`~/.cache/keras_rwkv`, or `$KERAS_RWKV_CACHE`; `hf://` handles under
`<root>/hf/<org>/<repo>`. `KERAS_RWKV_PRESET_HUB` picks the hub of a named
preset (default: ModelScope, or Hugging Face when ModelScope cannot be
reached).
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
from importlib import resources

from keras_rwkv.utils import hub_download
from keras_rwkv.utils import settings
from keras_rwkv.utils.files import file_lock
from keras_rwkv.utils.hub_download import PresetDownloadError
from keras_rwkv.utils.hub_download import check_disk_space
from keras_rwkv.utils.hub_download import gigabytes

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


def hf_preset_dir(repo_id):
    """Where the converted `hf://{repo_id}` lives."""
    return os.path.join(cache_root(), "hf", *repo_id.split("/"))


def _complete(directory):
    return os.path.exists(os.path.join(directory, "config.json"))


def is_cached(name):
    return _complete(preset_dir(name))


def unknown_preset_error(name):
    return ValueError(
        f"Unknown RWKV6 preset {name!r}. Available presets: "
        f"{', '.join(sorted(MANIFEST))}. A local preset directory (from "
        "`keras-rwkv convert`), an 'hf://org/repo' handle of an RWKV6 "
        "Hugging Face repository, or a 'modelscope://org/repo' handle of a "
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


def _ensure(target, key, fetch):
    """Makes sure `target` holds a converted preset, calling
    `fetch(download_dir)` (which downloads and converts) when it does
    not; `key` names the lock and the download directory."""
    if _complete(target):
        return target
    created = _make_dirs(cache_root())
    download_dir = os.path.join(cache_root(), "downloads", key)
    try:
        with _lock(key):
            if not _complete(target):  # or another process finished it
                try:
                    fetch(download_dir)
                finally:
                    # A broken download must not be reused by the next
                    # attempt, and a good one is not needed once converted.
                    if not (settings.keep_downloads() and _complete(target)):
                        shutil.rmtree(download_dir, ignore_errors=True)
    finally:
        # A failed attempt leaves nothing: no lock file, no empty dirs.
        _remove_empty_dirs([os.path.dirname(download_dir), *created])
    return target


def _convert_into(path, target, what):
    """Converts the checkpoint at `path` into the preset `target`."""
    from keras_rwkv.convert import CheckpointError
    from keras_rwkv.convert import convert_checkpoint
    from keras_rwkv.convert import write_preset
    from keras_rwkv.models.rwkv6.rwkv6_causal_lm_preprocessor import (
        RWKV6CausalLMPreprocessor,
    )
    from keras_rwkv.models.rwkv6.rwkv6_tokenizer import RWKV6Tokenizer

    print(f"Converting {what} (once).", file=sys.stderr)
    try:
        backbone = convert_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(
            f"The downloaded files of {what} are not usable and were "
            f"deleted ({e}). Loading the preset again downloads them anew."
        ) from e
    preprocessor = RWKV6CausalLMPreprocessor(RWKV6Tokenizer())
    # Replaces an incomplete entry (no config.json) of ours, if any.
    write_preset([backbone, preprocessor], target, overwrite=True)


def ensure_preset(name):
    """Makes sure the named preset is converted in the cache; returns its
    directory. Downloads and converts on first use only."""
    if name not in MANIFEST:
        raise unknown_preset_error(name)

    def fetch(download_dir):
        hub = _choose_hub(name)
        if hub == "huggingface":
            repo_id = MANIFEST[name]["huggingface"]["repo_id"]
            _fetch_hf(
                repo_id, preset_dir(name), f"preset {name!r}", download_dir
            )
        else:
            _fetch_modelscope(name, download_dir)

    return _ensure(preset_dir(name), name, fetch)


def _choose_hub(name):
    """The hub a named preset is fetched from: `KERAS_RWKV_PRESET_HUB`
    if set, else the first the manifest lists that can be reached."""
    entry = MANIFEST[name]
    hubs = ["modelscope"] + (["huggingface"] if "huggingface" in entry else [])
    forced = settings.preset_hub()
    if forced is not None:
        if forced not in hubs:
            raise ValueError(
                f"{settings.PRESET_HUB_ENV_VAR}={forced}: preset {name!r} "
                f"is only on {', '.join(hubs)}."
            )
        hub_download.check_reachable(forced)
        return forced
    for hub in hubs:
        if hub_download.resolves(hub_download.hub_host(hub)) is None:
            return hub
    hub_download.check_reachable(hubs[0])  # raises: offline
    return hubs[0]


def _fetch_modelscope(name, download_dir):
    entry = MANIFEST[name]
    source = entry["source"]
    files = [source["file"]] if "file" in source else source["files"]
    size = 2 * entry["params"]  # World checkpoints are bfloat16
    # The download and the converted preset, side by side.
    check_disk_space(cache_root(), 2 * size, f"preset {name!r}")
    print(
        f"Downloading preset {name} ({', '.join(files)}, about "
        f"{gigabytes(size)}) from ModelScope {source['modelscope_id']}; it "
        f"is converted once and cached in {preset_dir(name)}.",
        file=sys.stderr,
    )
    for file_name in files:
        path = hub_download.modelscope_download(
            source["modelscope_id"], file_name, download_dir
        )
    if source["format"] == "blinkdl_pth":
        _check_sha256(path, source.get("sha256"))
    else:  # a directory of files (bert4keras3 export)
        path = os.path.dirname(path)
    _convert_into(path, preset_dir(name), f"preset {name}")


def _fetch_hf(repo_id, target, what, download_dir):
    """Downloads `config.json` and the weights of an RWKV6 Hugging Face
    repository (nothing else) and converts them into `target`."""
    from keras_rwkv.convert import huggingface

    hub_download.check_reachable("huggingface")
    files = hub_download.hf_files(repo_id)
    config = _hf_config(repo_id, download_dir)
    if not huggingface.is_rwkv6_config(config):
        raise PresetDownloadError(
            f"Hugging Face repository {repo_id} holds a "
            f"{config.get('model_type', 'non-RWKV6')!r} model, not RWKV6.\n"
            "Check the name of the repository."
        )
    names = _hf_weight_files(repo_id, files, download_dir)
    size = sum(files.get(n, 0) for n in names)
    # The download and the converted preset, side by side.
    check_disk_space(cache_root(), 2 * size, what)
    print(
        f"Downloading {what} ({len(names)} file(s), about {gigabytes(size)}) "
        f"from Hugging Face {repo_id}; it is converted once and cached in "
        f"{target}.",
        file=sys.stderr,
    )
    for file_name in names:
        hub_download.hf_download(repo_id, file_name, download_dir)
    _convert_into(download_dir, target, what)


def _hf_config(repo_id, download_dir):
    path = hub_download.hf_download(repo_id, "config.json", download_dir)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise PresetDownloadError(
            f"The config.json of Hugging Face repository {repo_id} cannot "
            f"be read ({e}).\nCheck the name of the repository."
        ) from None


def _hf_weight_files(repo_id, files, download_dir):
    """The weight files to fetch: a shard index and its shards, or the one
    file; safetensors before `pytorch_model.bin`."""
    from keras_rwkv.convert import huggingface

    for index, single, _ in huggingface.WEIGHT_FORMATS:
        if index in files:
            path = hub_download.hf_download(repo_id, index, download_dir)
            try:
                with open(path, encoding="utf-8") as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise PresetDownloadError(
                    f"{index} of Hugging Face repository {repo_id} is not a "
                    "shard index.\nReport it to the repository's owner."
                ) from None
            return shards
        if single in files:
            return [single]
    raise PresetDownloadError(
        f"Hugging Face repository {repo_id} has no model.safetensors or "
        "pytorch_model.bin (sharded or not).\nCheck the name of the "
        "repository."
    )


# What a Hugging Face repository id looks like ("org/name"); anything else
# never becomes a path in the cache.
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# hf:// repositories found not to be RWKV6 in a Hugging Face layout (a
# KerasHub preset, say): KerasHub loads them, we do not ask again.
_NOT_OURS = set()


def prepare_hf(preset):
    """For an `hf://org/repo` handle: the converted directory of an RWKV6
    repository in a Hugging Face layout (downloaded and converted first if
    not in the cache), or None when KerasHub should load it itself."""
    from keras_rwkv.convert import huggingface

    repo_id = preset[len("hf://") :].strip("/")
    if not REPO_ID.fullmatch(repo_id) or ".." in repo_id:
        return None  # KerasHub says what is wrong with the handle
    target = hf_preset_dir(repo_id)
    if _complete(target):
        return target  # no network
    if repo_id in _NOT_OURS:
        return None
    try:  # into Hugging Face's own cache, where KerasHub looks too
        path = hub_download.hf_download(repo_id, "config.json")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (PresetDownloadError, OSError, ValueError):
        return None  # KerasHub says what is wrong with the handle
    if not huggingface.is_rwkv6_config(config):
        _NOT_OURS.add(repo_id)
        return None
    key = "hf-" + repo_id.replace("/", "--")
    return _ensure(
        target,
        key,
        lambda download_dir: _fetch_hf(
            repo_id, target, f"hf://{repo_id}", download_dir
        ),
    )


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
    converted directory of a named preset or of an RWKV6 `hf://` handle
    (fetched and converted first if needed), or None for anything else.

    Raises:
        ValueError: `preset` looks like a misspelt RWKV6 preset name (it
            starts with "rwkv6", is not a path, a handle or one of
            `registered`), saying which names exist.
    """
    if not isinstance(preset, str):
        return None
    if preset in MANIFEST:
        return ensure_preset(preset)
    if preset.lower().startswith("hf://"):
        return prepare_hf(preset)
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
