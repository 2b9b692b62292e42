"""Writing a preset directory so that nothing is ever lost.

- The preset is saved into a temporary directory beside the target and
  renamed into place when complete: an interrupted run leaves no
  half-written preset (and the next writer sweeps its temporary files).
- `overwrite` replaces only a directory recognised as a keras-rwkv preset
  (only preset files; a config naming a keras-rwkv class), never one with
  other files in it, never the directory holding the input, never the
  current directory or one above it.
- Writers of one target take a lock beside it, so concurrent writers
  serialise: the second then finds the preset there and, without
  `overwrite`, says so. Whatever appears at the target while the preset is
  written (by anyone else) is left as it is.
"""

import errno
import json
import os
import shutil
import tempfile

from keras_rwkv.utils.files import file_lock

# What KerasHub's `save_to_preset` writes into a preset directory.
PRESET_ENTRIES = frozenset(
    {
        "assets",
        "config.json",
        "metadata.json",
        "model.weights.h5",
        "preprocessor.json",
        "task.json",
        "task.weights.h5",
        "tokenizer.json",
    }
)
TEMP_PREFIX = ".keras_rwkv-"


class PresetWriteError(FileExistsError):
    """The preset cannot be written where asked; nothing was changed."""


def _inside(path, directory):
    """Whether `path` is `directory` or lies inside it."""
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def _foreign_entries(path):
    """Entries of the directory `path` that make it not a keras-rwkv preset
    (an empty list: it may be replaced)."""
    entries = sorted(os.listdir(path))
    foreign = [e for e in entries if e not in PRESET_ENTRIES]
    config = os.path.join(path, "config.json")
    if not foreign and os.path.isfile(config):
        try:
            with open(config, encoding="utf-8") as f:
                name = json.load(f).get("registered_name", "")
        except (OSError, ValueError, AttributeError):
            name = "keras_rwkv>"  # a damaged preset of ours: replaceable
        if not str(name).startswith("keras_rwkv>"):
            foreign = [f"config.json of {name or 'another model'}"]
    return foreign


def check_target(output_dir, overwrite=False, protect=()):
    """Raises `PresetWriteError` unless a preset may be written at
    `output_dir` (see the module docstring)."""
    if _inside(os.getcwd(), output_dir):
        raise PresetWriteError(
            f"{output_dir} is the current directory or holds it; a preset "
            "is never written over it. Choose a new directory."
        )
    for path in protect:
        if _inside(path, output_dir):
            raise PresetWriteError(
                f"{output_dir} holds the input {path}; writing the preset "
                "there would delete it. Choose another directory."
            )
    if not os.path.lexists(output_dir):
        return
    if not os.path.isdir(output_dir) or os.path.islink(output_dir):
        raise PresetWriteError(
            f"{output_dir} exists and is not a directory. Choose another path."
        )
    if not overwrite:
        raise PresetWriteError(
            f"{output_dir} already exists. Choose another directory, or "
            "pass --overwrite (overwrite=True) to replace a keras-rwkv "
            "preset there."
        )
    foreign = _foreign_entries(output_dir)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise PresetWriteError(
            f"{output_dir} is not a keras-rwkv preset (it holds {shown}); "
            "--overwrite replaces only a preset. Choose another directory."
        )


def _sweep(parent, name):
    """Removes temporary directories of earlier writers of `name` that
    died (the lock held now says no writer of it is alive)."""
    for entry in os.listdir(parent):
        if entry.startswith(f"{TEMP_PREFIX}{name}-"):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _appeared(output_dir):
    return PresetWriteError(
        f"{output_dir} appeared while the preset was written; it was left "
        "as it is and nothing was written. Choose another directory."
    )


def _swap_into_place(tmp, output_dir, overwrite, protect):
    if os.path.lexists(output_dir):
        if not overwrite:
            raise _appeared(output_dir)
        # May have changed while the preset was written.
        check_target(output_dir, overwrite, protect)
        old = tmp + ".old"
        os.rename(output_dir, old)
        os.rename(tmp, output_dir)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, output_dir)  # never over a non-empty directory
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise _appeared(output_dir) from None
        raise


def write_preset(models, output_dir, overwrite=False, protect=()):
    """Saves KerasHub objects (a backbone, tokenizer, preprocessor or task,
    or a list of them) as one preset directory, safely (module docstring).

    Args:
        models: what to save, in order.
        output_dir: the preset directory.
        overwrite: replace a keras-rwkv preset already at `output_dir`.
        protect: paths that must survive (the input checkpoint).

    Returns:
        The absolute path of the preset directory.

    Raises:
        PresetWriteError: the target may not be written; nothing changed.
    """
    output_dir = os.path.abspath(os.fspath(output_dir))
    check_target(output_dir, overwrite, protect)  # fail before the work
    parent, name = os.path.split(output_dir)
    os.makedirs(parent, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise PresetWriteError(
            f"Cannot write into {parent} (permission denied). Choose "
            "another directory."
        )
    with file_lock(os.path.join(parent, f".{name}.keras_rwkv.lock")):
        _sweep(parent, name)
        check_target(output_dir, overwrite, protect)  # after any wait
        tmp = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{name}-", dir=parent)
        try:
            if not isinstance(models, (list, tuple)):
                models = [models]
            for model in models:
                model.save_to_preset(tmp)
            _swap_into_place(tmp, output_dir, overwrite, protect)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, PresetWriteError) or e.errno is None:
                raise
            raise PresetWriteError(
                f"Could not write the preset into {parent}: {e.strerror}. "
                f"Nothing was changed at {output_dir}."
            ) from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return output_dir
