"""Builds keras-rwkv's CUDA libraries with nvcc on first use and caches them.

A flavour is one library: the WKV6 kernels for JAX ("jax") or torch
("torch"), and the decoding-step matrix-vector products for JAX
("matvec_jax", `keras_rwkv/ops/matvec/cuda`) and the fused pieces of
a decoding step ("step_jax", the same folder). The cache file name carries a
hash of the kernel sources, the flavour, the GPU architecture and the
framework version,
so a change of any of them builds a fresh library and stale ones are never
loaded. Set `KERAS_RWKV_CACHE` to move the cache (default
`~/.cache/keras_rwkv`, see `keras_rwkv.utils.settings`), and `CUDA_HOME`
(or `PATH`) to choose nvcc.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from keras_rwkv.utils import settings

SOURCE_DIR = Path(__file__).resolve().parent
MATVEC_DIR = SOURCE_DIR.parents[1] / "matvec" / "cuda"
WKV6_HEADERS = (
    "wkv6_dispatch.cuh",
    "wkv6_kernels.cuh",
    "wkv6_params.cuh",
    "wkv6_parallel.cuh",
    "wkv6_parallel_bwd.cuh",
)
# flavour: (library name, translation unit, headers it includes); the
# cache key hashes all of them, so an edited header rebuilds the library.
FLAVORS = {
    "jax": ("wkv6_jax", SOURCE_DIR / "wkv6_jax_ffi.cu", WKV6_HEADERS),
    "torch": ("wkv6_torch", SOURCE_DIR / "wkv6_c_api.cu", WKV6_HEADERS),
    "matvec_jax": (
        "matvec_jax",
        MATVEC_DIR / "matvec_jax_ffi.cu",
        ("matvec_kernels.cuh",),
    ),
    "step_jax": (
        "step_jax",
        MATVEC_DIR / "step_jax_ffi.cu",
        ("step_kernels.cuh", "step_mix.cuh", "step_common.cuh"),
    ),
}


class CudaKernelUnavailable(RuntimeError):
    """The CUDA WKV kernel cannot be built or run here."""


def find_nvcc():
    """Returns the path of nvcc, or None.

    Looks at `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, `PATH`, then
    `/usr/local/cuda/bin`.

    Returns:
        A path string or `None`.
    """
    for root in settings.cuda_roots():
        if (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def cache_dir():
    """Returns the cache directory (not created): the cache root
    (`keras_rwkv.utils.settings`).

    Returns:
        A `Path`.
    """
    return Path(settings.cache_root())


def source_files(flavor):
    """Returns the source files that make up one flavour's library.

    Args:
        flavor: a key of `FLAVORS`.

    Returns:
        A list of `Path`s, the translation unit first.
    """
    if flavor not in FLAVORS:
        raise ValueError(f"Unknown CUDA library flavour {flavor!r}.")
    _, unit, headers = FLAVORS[flavor]
    return [unit] + [unit.parent / header for header in headers]


def library_path(flavor, arch, framework_version):
    """Returns where the library for this configuration is cached.

    Args:
        flavor: a key of `FLAVORS`.
        arch: compute capability without the dot, e.g. `"90"`.
        framework_version: version string of jax(lib) or torch.

    Returns:
        A `Path` inside `cache_dir()`.
    """
    digest = hashlib.sha256()
    for path in source_files(flavor):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(f"{flavor}|sm_{arch}|{framework_version}".encode())
    name = f"{FLAVORS[flavor][0]}_sm{arch}_{digest.hexdigest()[:16]}.so"
    return cache_dir() / name


def nvcc_command(nvcc, flavor, arch, output, include_dirs=()):
    """The nvcc command line that builds one flavour's library.

    Args:
        nvcc: path of nvcc.
        flavor: a key of `FLAVORS`.
        arch: compute capability without the dot.
        output: path of the shared library to write.
        include_dirs: extra include directories (the XLA FFI headers).

    Returns:
        A list of arguments.
    """
    cmd = [
        nvcc,
        "-O3",
        "-std=c++17",
        "-shared",
        "-Xcompiler",
        "-fPIC",
        # Exact machine code for the card in use: no PTX JIT at start-up.
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        # Noise from the XLA FFI headers.
        "-diag-suppress=940,2473",
        "-Xcompiler",
        "-Wno-return-type",
        "-o",
        str(output),
        str(source_files(flavor)[0]),
    ]
    for inc in include_dirs:
        cmd.insert(-3, f"-I{inc}")
    return cmd


def build(flavor, arch, framework_version, include_dirs=(), quiet=False):
    """Returns the path of the library, building it first if needed.

    Args:
        flavor: a key of `FLAVORS`.
        arch: compute capability without the dot, e.g. `"90"`.
        framework_version: version string that keys the cache.
        include_dirs: extra include directories.
        quiet: if True, print nothing while building.

    Returns:
        A `Path` to the shared library.

    Raises:
        CudaKernelUnavailable: nvcc is missing or the build failed.
    """
    target = library_path(flavor, arch, framework_version)
    if target.is_file():
        return target
    nvcc = find_nvcc()
    if nvcc is None:
        raise CudaKernelUnavailable(
            "The CUDA WKV kernel needs nvcc to build on first use, and "
            "none was found (looked in $CUDA_HOME/bin, $CUDA_PATH/bin, PATH "
            "and /usr/local/cuda/bin). Install the CUDA toolkit or use "
            "kernel='python' (KERAS_RWKV_WKV_KERNEL=python)."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(
            f"keras_rwkv: building the CUDA kernels ({flavor}, sm_{arch})"
            f" into {target}; this happens once and takes up to a minute.",
            file=sys.stderr,
            flush=True,
        )
    # Build beside the target and rename: a concurrent process either
    # sees no library or a complete one.
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    try:
        cmd = nvcc_command(nvcc, flavor, arch, tmp, include_dirs)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CudaKernelUnavailable(
                f"Building the CUDA kernels ({flavor}) failed:\n"
                + " ".join(cmd)
                + "\n"
                + (proc.stderr or proc.stdout)[-4000:]
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
