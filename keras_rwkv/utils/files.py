"""Writing files so that an interrupted write never leaves a broken one."""

import os
import tempfile

import numpy as np


def atomic_savez(path, **arrays):
    """`np.savez` to a temporary file beside `path`, then rename. Adds the
    `.npz` suffix if missing; returns the final path."""
    path = os.fspath(path)
    if not path.endswith(".npz"):
        path += ".npz"
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=directory)
    os.close(fd)
    try:
        np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
