"""Writing files so that an interrupted write never leaves a broken one,
and a lock for writers of one path."""

import contextlib
import fcntl
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


@contextlib.contextmanager
def file_lock(path):
    """An exclusive lock on `path` across processes (created if needed,
    removed afterwards, so nothing is left behind)."""
    while True:
        f = open(path, "w")
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not removed meanwhile by the holder before us
            break
        f.close()
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        f.close()
