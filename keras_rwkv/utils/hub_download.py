"""Fetching preset files from ModelScope and Hugging Face, failing fast
and clearly.

Offline, the SDKs retry for about a minute before they give up, so the
hub's name is looked up first (`check_reachable`). Errors are
`PresetDownloadError`s of two lines: what failed, then what to do. The
SDK calls here are the only ones; tests fake them at this boundary.
"""

import shutil
import socket
import threading
import urllib.parse

NAME_LOOKUP_TIMEOUT = 10.0
LOCAL_HINT = (
    "or use a local checkpoint: `keras-rwkv convert FILE.pth DIR`, then "
    "--preset DIR."
)
HUBS = {
    "modelscope": (
        "ModelScope",
        "Check the connection (or set MODELSCOPE_DOMAIN for a mirror), "
        + LOCAL_HINT,
    ),
    "huggingface": (
        "Hugging Face",
        "Check the connection (or set HF_ENDPOINT for a mirror), " + LOCAL_HINT,
    ),
}


class PresetDownloadError(OSError):
    """A preset's files could not be fetched from the hub."""


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


def hub_host(hub):
    """The host name of the endpoint in use for `hub` ("modelscope" or
    "huggingface")."""
    if hub == "modelscope":
        from modelscope.hub.utils.utils import get_endpoint

        endpoint = get_endpoint()
    else:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    return urllib.parse.urlparse(endpoint).hostname


def resolves(host, timeout=NAME_LOOKUP_TIMEOUT):
    """None if `host` resolves within `timeout` seconds, else why not."""
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
        return None
    return result.get("error") or f"no answer in {timeout:.0f} s"


def check_reachable(hub):
    """Raises `PresetDownloadError` at once when the hub's host does not
    resolve (this machine is offline)."""
    host = hub_host(hub)
    reason = resolves(host)
    if reason is not None:
        name, hint = HUBS[hub]
        raise PresetDownloadError(
            f"Cannot reach {name}: the name lookup of {host} failed "
            f"({reason}); this machine looks offline.\n{hint}"
        )


def _failed(hub, what, error):
    name, hint = HUBS[hub]
    return PresetDownloadError(
        f"Could not download {what} from {name}: {type(error).__name__}: "
        f"{_first_line(error)}\n{hint}"
    )


def modelscope_download(model_id, file_name, local_dir):
    """Fetches one file of a ModelScope model repository (the SDK shows a
    progress bar); returns its path."""
    from modelscope.hub import file_download

    try:
        return file_download.model_file_download(
            model_id=model_id, file_path=file_name, local_dir=local_dir
        )
    except Exception as e:
        raise _failed("modelscope", f"{file_name} of {model_id}", e) from e


def hf_files(repo_id):
    """The files of a Hugging Face model repository: name -> size in
    bytes (0 where the hub does not say)."""
    import huggingface_hub

    try:
        info = huggingface_hub.model_info(repo_id, files_metadata=True)
    except Exception as e:
        raise _failed("huggingface", f"the file list of {repo_id}", e) from e
    return {s.rfilename: int(s.size or 0) for s in info.siblings or ()}


def hf_download(repo_id, file_name, local_dir=None):
    """Fetches one file of a Hugging Face model repository (the SDK shows
    a progress bar and resumes); returns its path."""
    import huggingface_hub

    try:
        return huggingface_hub.hf_hub_download(
            repo_id=repo_id, filename=file_name, local_dir=local_dir
        )
    except Exception as e:
        raise _failed("huggingface", f"{file_name} of {repo_id}", e) from e


def _first_line(error, limit=200):
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."
