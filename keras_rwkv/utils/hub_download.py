"""Fetching preset files from ModelScope, failing fast and clearly.

Offline, the ModelScope SDK retries for about a minute before it gives
up, so the hub's name is looked up first (`check_reachable`). Errors are
`PresetDownloadError`s of two lines: what failed, then what to do.
"""

import shutil
import socket
import threading
import urllib.parse

NAME_LOOKUP_TIMEOUT = 10.0
OFFLINE_HINT = (
    "Check the connection (or set MODELSCOPE_DOMAIN for a mirror), or use "
    "a local checkpoint: `keras-rwkv convert FILE.pth DIR`, then "
    "--preset DIR."
)


class PresetDownloadError(OSError):
    """A preset's files could not be fetched from ModelScope."""


def gigabytes(size):
    return f"{size / 1e9:.1f} GB"


def check_disk_space(directory, needed, what):
    """Raises unless `directory` has `needed` bytes free for `what`."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise PresetDownloadError(
            f"Not enough disk space for {what}: it needs about "
            f"{gigabytes(needed)} in {directory}, which has "
            f"{gigabytes(free)} free.\nFree some space, or set "
            "KERAS_RWKV_CACHE to a directory on a larger disk."
        )


def hub_host():
    """The host name of the ModelScope endpoint in use."""
    from modelscope.hub.utils.utils import get_endpoint

    return urllib.parse.urlparse(get_endpoint()).hostname


def check_reachable(host, timeout=NAME_LOOKUP_TIMEOUT):
    """Raises `PresetDownloadError` at once when `host` does not resolve
    (or not within `timeout` seconds)."""
    result = {}

    def lookup():
        try:
            socket.getaddrinfo(host, 443)
            result["ok"] = True
        except OSError as e:
            result["error"] = e

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(timeout)
    if result.get("ok"):
        return
    reason = result.get("error") or f"no answer in {timeout:.0f} s"
    raise PresetDownloadError(
        f"Cannot reach ModelScope: the name lookup of {host} failed "
        f"({reason}); this machine looks offline.\n{OFFLINE_HINT}"
    )


def download(model_id, file_name, local_dir):
    """Fetches one file of a ModelScope model repository (the SDK shows a
    progress bar); returns its path."""
    from modelscope.hub import file_download

    try:
        return file_download.model_file_download(
            model_id=model_id, file_path=file_name, local_dir=local_dir
        )
    except Exception as e:
        raise PresetDownloadError(
            f"Could not download {file_name} from ModelScope model "
            f"{model_id}: {type(e).__name__}: {_first_line(e)}\n"
            f"{OFFLINE_HINT}"
        ) from e


def _first_line(error, limit=200):
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."
