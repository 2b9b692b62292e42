"""The installed `keras-rwkv` command as a new user meets it: a fresh HOME,
no KERAS_BACKEND, child processes (Keras picks its backend once a
process). They run in the JAX pass of CI only: the parent's backend plays
no part."""

import os
import re
import shutil
import subprocess
import sys
import time

import keras
import pytest

from keras_rwkv.entry import is_cli_process
from tests.fake_network import OFFLINE_SITECUSTOMIZE
from tests.reference import save_tiny_world_preset

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="child processes; run once, in the JAX pass",
)

SCRIPT = shutil.which("keras-rwkv")


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    path = tmp_path_factory.mktemp("cl") / "preset"
    save_tiny_world_preset(path)
    return str(path)


def user_env(home, **extra):
    """The environment of a user who never set a Keras variable."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KERAS", "TF_", "JAX_", "XDG_"))
    }
    env.update(HOME=str(home), **extra)
    return env


def run(args, env, timeout=300):
    started = time.perf_counter()
    proc = subprocess.run(
        args, env=env, capture_output=True, text=True, timeout=timeout
    )
    return proc, time.perf_counter() - started


def generate_args(preset, *extra):
    return [
        "generate",
        "--preset",
        preset,
        "--max-new-tokens",
        "3",
        "--seed",
        "1",
        *extra,
        "Hello",
    ]


@pytest.mark.skipif(SCRIPT is None, reason="keras-rwkv is not installed")
def test_console_script_runs_on_jax_and_quietly(preset, tmp_path):
    env = user_env(tmp_path)
    proc, _ = run([SCRIPT, *generate_args(preset, "--verbose")], env)
    assert proc.returncode == 0, proc.stderr
    assert "backend jax (no KERAS_BACKEND set; jax is installed)" in proc.stderr
    assert proc.stdout.startswith("Hello")
    # Without --verbose: the text and nothing else (no TensorFlow, absl,
    # oneDNN or kernel lines).
    proc, _ = run([SCRIPT, *generate_args(preset)], env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.startswith("Hello")
    # TensorFlow's C++ start-up lines are not shown either; errors are.
    tf = [SCRIPT, *generate_args(preset, "--backend", "tensorflow")]
    proc, _ = run(tf, env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    proc, _ = run(
        [SCRIPT, *generate_args("/nonexistent", "--backend", "tensorflow")], env
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: cannot load preset '/nonexistent'")
    assert len(proc.stderr.strip().splitlines()) == 2


def test_python_m_and_an_explicit_backend(preset, tmp_path):
    args = [sys.executable, "-m", "keras_rwkv"]
    proc, _ = run(
        [*args, *generate_args(preset, "--verbose", "--backend", "torch")],
        user_env(tmp_path, KERAS_BACKEND="jax"),  # --backend wins
    )
    assert proc.returncode == 0, proc.stderr
    assert "backend torch (--backend)" in proc.stderr
    proc, _ = run(
        [*args, *generate_args(preset, "--verbose")],
        user_env(tmp_path, KERAS_BACKEND="torch"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "backend torch (KERAS_BACKEND)" in proc.stderr


def cache_counts(stderr):
    found = re.search(r"(\d+) programs loaded, (\d+) compiled", stderr)
    assert found, stderr
    return int(found[1]), int(found[2])


def test_second_process_loads_every_program_from_the_cache(preset, tmp_path):
    # Fresh cache at the start; the timing is in benchmarks/first_token.py.
    env = user_env(tmp_path)
    cache = tmp_path / ".cache" / "keras_rwkv" / "jax_compilation_cache"
    first, _ = run(["keras-rwkv", *generate_args(preset, "-v")], env)
    assert first.returncode == 0, first.stderr
    loaded, compiled = cache_counts(first.stderr)
    assert compiled > 0 and cache.is_dir()
    second, _ = run(["keras-rwkv", *generate_args(preset, "-v")], env)
    assert second.returncode == 0, second.stderr
    assert cache_counts(second.stderr) == (loaded + compiled, 0)
    assert second.stdout == first.stdout  # same seed, same text
    # Turned off, nothing is loaded or written.
    off, _ = run(
        ["keras-rwkv", *generate_args(preset, "-v")],
        user_env(tmp_path, KERAS_RWKV_COMPILATION_CACHE="0"),
    )
    assert "compilation cache: off" in off.stderr
    assert "programs loaded" not in off.stderr


def test_offline_first_run_fails_fast_in_two_lines(tmp_path):
    # The real ModelScope SDK, with every name lookup failing (offline).
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(OFFLINE_SITECUSTOMIZE)
    home = tmp_path / "home"
    home.mkdir()
    env = user_env(home, PYTHONPATH=str(site))
    proc, seconds = run(
        [sys.executable, "-m", "keras_rwkv", "generate", "Hello"], env
    )
    assert proc.returncode != 0
    assert seconds < 20
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith("error: Cannot reach ModelScope")
    assert "keras-rwkv convert" in lines[1]
    # The cache as it was (none); Keras writes its own ~/.keras/keras.json.
    assert not (home / ".cache").exists()


@pytest.mark.parametrize(
    "argv0, orig_argv, expected",
    [
        ("/usr/bin/keras-rwkv", ["python", "/usr/bin/keras-rwkv"], True),
        ("-m", ["python", "-m", "keras_rwkv", "chat"], True),
        ("-m", ["python", "-X", "importtime", "-m", "keras_rwkv"], True),
        ("-m", ["python", "-mkeras_rwkv.cli"], True),
        ("-c", ["python", "-c", "import keras_rwkv"], False),
        ("app.py", ["python", "app.py"], False),
        ("-m", ["python", "-m", "pytest"], False),
        ("", ["python"], False),
    ],
)
def test_which_processes_are_the_command_line(argv0, orig_argv, expected):
    assert is_cli_process(argv0, orig_argv) is expected


def test_serve_answers_the_openai_api_and_stops_on_ctrl_c(preset, tmp_path):
    # The installed script, as a user starts it; then Ctrl-C.
    import json
    import signal
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [SCRIPT, "serve", "--preset", preset, "--port", str(port)],
        env=user_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the server did not start"
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    health = json.load(r)
                break
            except OSError:
                time.sleep(0.5)
        assert health["status"] == "ok"
        with urllib.request.urlopen(base + "/v1/models", timeout=30) as r:
            models = json.load(r)
        # The model's name defaults to the preset's.
        assert models["data"][0]["id"] == os.path.basename(preset)
        body = json.dumps(
            {
                "model": os.path.basename(preset),
                "prompt": "Hello",
                "max_tokens": 3,
                "temperature": 0,
            }
        ).encode()
        request = urllib.request.Request(
            base + "/v1/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as r:
            reply = json.load(r)
        assert reply["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, 130), err[-2000:]
    assert "serving" in err and f":{port}/v1" in err
    assert "Traceback" not in err


def test_serve_without_its_extra_says_what_to_install(
    preset, monkeypatch, capsys
):
    from keras_rwkv import cli
    from keras_rwkv.serve import server

    def missing():
        raise ImportError(server.MISSING_EXTRA)

    monkeypatch.setattr(server, "check_extra", missing)
    code = cli.main(["serve", "--preset", preset])
    err = capsys.readouterr().err
    assert code == 2
    assert "pip install 'keras-rwkv[serve]'" in err
    assert len(err.strip().splitlines()) <= 2
