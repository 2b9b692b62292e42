"""What a `keras-rwkv` process sets up before Keras is imported.

Keras picks its backend once, at its first import, and keras-hub pulls in
TensorFlow, which makes TensorFlow Keras's default. A command line user
who never set `KERAS_BACKEND` would get the slowest path. So the package's
`__init__` calls `prepare_cli_process()` first: in the console script or
`python -m keras_rwkv` it

- chooses the backend: `--backend`, else `KERAS_BACKEND`, else JAX when
  it is installed, else torch, else TensorFlow;
- on the JAX and torch backends hides TensorFlow from the process (keras-hub
  runs without it; importing it costs seconds and prints native log lines);
- and returns True, so that the package skips its eager imports (`--help`
  needs no Keras).

Nothing here imports Keras; in any other process it does nothing.
"""

import importlib.util
import os
import sys

BACKENDS = ("jax", "torch", "tensorflow")
SCRIPT_NAMES = ("keras-rwkv", "keras-rwkv.exe", "keras-rwkv-script.py")
MODULE_NAMES = ("keras_rwkv", "keras_rwkv.cli", "keras_rwkv.__main__")

# (backend, why) once chosen in this process.
choice = None


def is_cli_process(argv0=None, orig_argv=None):
    """Whether this process is the `keras-rwkv` command line."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    orig_argv = (
        getattr(sys, "orig_argv", []) if orig_argv is None else orig_argv
    )
    if os.path.basename(argv0) in SCRIPT_NAMES:
        return True
    args = iter(orig_argv[1:])
    for arg in args:
        if arg == "-m":  # `python [options] -m keras_rwkv ...`
            return next(args, None) in MODULE_NAMES
        if arg.startswith("-m"):
            return arg[2:] in MODULE_NAMES
        if arg in ("-X", "-W", "--check-hash-based-pycs"):
            next(args, None)  # an option's own argument
        elif arg.startswith("-c") or not arg.startswith("-"):
            return False  # a program or script of someone else's
    return False


def backend_flag(args):
    """The value of `--backend` in `args`, or None."""
    for i, arg in enumerate(args):
        if arg == "--backend" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--backend="):
            return arg.split("=", 1)[1]
    return None


def choose_backend(args, environ):
    """`(backend, why)` for a command line run with `args`."""
    flag = backend_flag(args)
    if flag:
        return flag, "--backend"
    if environ.get("KERAS_BACKEND"):
        return environ["KERAS_BACKEND"], "KERAS_BACKEND"
    for name in BACKENDS:
        if importlib.util.find_spec(name) is not None:
            return name, f"no KERAS_BACKEND set; {name} is installed"
    return "tensorflow", "no KERAS_BACKEND set and no backend found"


def prepare_cli_process():
    """Sets up a command line process before Keras is imported (see the
    module docstring). Returns whether this process is the command line."""
    global choice
    if not is_cli_process():
        return False
    if "keras" in sys.modules:  # too late to choose; `cli.main` says so
        return True
    backend, why = choose_backend(sys.argv[1:], os.environ)
    choice = (backend, why)
    if backend not in BACKENDS:
        return True  # `cli.main` explains
    os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if backend != "tensorflow":
        for name in ("tensorflow", "tensorflow_text"):
            sys.modules.setdefault(name, None)  # `import` raises ImportError
    return True


def drop_native_stderr():
    """Sends what native code writes to file descriptor 2 to /dev/null for
    the rest of the process, while Python's `sys.stderr` (our messages,
    warnings, tracebacks) keeps the real stderr: TensorFlow's C++ runtime
    prints its start-up lines at import and at first use, before its log
    settings apply."""
    sys.stderr.flush()
    real = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    sys.stderr = os.fdopen(
        real,
        "w",
        buffering=1,
        encoding=sys.stderr.encoding,
        errors="backslashreplace",
    )
