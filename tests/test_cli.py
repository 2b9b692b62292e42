"""`keras-rwkv generate` and `keras-rwkv chat` against a preset directory
made by save_to_preset in the test."""

import io

import numpy as np
import pytest

from keras_rwkv import RWKV6State
from keras_rwkv.cli import main
from tests.reference import save_tiny_world_preset


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "preset"
    save_tiny_world_preset(path)
    return str(path)


GREEDY = [
    "--sampler",
    "greedy",
    "--presence-penalty",
    "0",
    "--frequency-penalty",
    "0",
]


def test_generate_streams_text(preset, capsys, tmp_path):
    args = [
        "generate",
        "--preset",
        preset,
        "--max-new-tokens",
        "12",
        *GREEDY,
        "Hello",
    ]
    assert main([*args, "--state-out", str(tmp_path / "s.npz")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("Hello") and len(printed) > len("Hello\n")
    state = RWKV6State.load(tmp_path / "s.npz")
    assert tuple(state.wkv.shape) == (1, 2, 2, 32, 32)
    # Same prompt, same greedy text: deterministic.
    assert main(args) == 0
    assert capsys.readouterr().out == printed
    # Continuing from the saved state works.
    assert (
        main(
            [
                "generate",
                "--preset",
                preset,
                "--max-new-tokens",
                "5",
                *GREEDY,
                "--state-in",
                str(tmp_path / "s.npz"),
                " more",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith(" more")


def test_sampling_options(preset, capsys):
    for sampler in ("top_p", "top_k", "random"):
        assert (
            main(
                [
                    "generate",
                    "--preset",
                    preset,
                    "--max-new-tokens",
                    "6",
                    "--sampler",
                    sampler,
                    "--top-k",
                    "5",
                    "--seed",
                    "3",
                    "--temperature",
                    "0.7",
                    "--repetition-penalty",
                    "1.2",
                    "--penalty-window",
                    "16",
                    "Hi",
                ]
            )
            == 0
        )
        assert capsys.readouterr().out.startswith("Hi")


def run_chat(preset, lines, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(lines)))
    assert (
        main(["chat", "--preset", preset, "--max-new-tokens", "8", *GREEDY])
        == 0
    )
    return capsys.readouterr().out


def replies(transcript):
    return [
        part.split("\n\nUser:")[0]
        for part in transcript.split("Assistant:")[1:]
    ]


def test_scripted_chat_keeps_the_state(preset, tmp_path, monkeypatch, capsys):
    saved = str(tmp_path / "chat.npz")
    plain = run_chat(preset, ["Hi\n", "Bye\n"], monkeypatch, capsys)
    scripted = run_chat(
        preset,
        [
            "Hi\n",
            f"/save {saved}\n",
            "/reset\n",
            "What?\n",
            "/reset\n",
            f"/load {saved}\n",
            "Bye\n",
            "/help\n",
            "/quit\n",
        ],
        monkeypatch,
        capsys,
    )
    assert "[state saved to" in scripted
    assert "[conversation reset]" in scripted
    assert "[state loaded from" in scripted
    assert "/reset" in scripted  # the help text
    plain_replies, scripted_replies = replies(plain), replies(scripted)
    assert len(plain_replies) == 2 and len(scripted_replies) == 3
    # "Bye" after /load continues the saved conversation exactly.
    assert scripted_replies[2] == plain_replies[1]


def test_chat_bad_state_file(preset, tmp_path, monkeypatch, capsys):
    (tmp_path / "junk.npz").write_bytes(b"junk")
    out = run_chat(
        preset, [f"/load {tmp_path / 'junk.npz'}\n"], monkeypatch, capsys
    )
    assert "cannot load" in out


def test_missing_preset(capsys):
    assert main(["generate", "--preset", "/nonexistent/dir", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot load preset '/nonexistent/dir'")
    assert "Traceback" not in err


def test_chat_survives_bad_state_files_with_its_state(
    preset, tmp_path, monkeypatch, capsys
):
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    keys = tmp_path / "keys.npz"
    np.savez(keys, format=np.array("keras_rwkv.RWKV6State"))
    other = tmp_path / "other.npz"
    RWKV6State(
        wkv=np.zeros((1, 1, 2, 32, 32), "float32"),
        shift=np.zeros((1, 1, 2, 64), "float32"),
    ).save(other)
    plain = run_chat(preset, ["Hi\n", "Bye\n"], monkeypatch, capsys)
    lines = ["Hi\n"]
    for bad in (empty, keys, other):
        lines.append(f"/load {bad}\n")
    lines += [f"/save {tmp_path / 'no' / 'dir.npz'}\n", "Bye\n"]
    scripted = run_chat(preset, lines, monkeypatch, capsys)
    assert scripted.count("[cannot load") == 3
    assert "[cannot save to" in scripted
    # The conversation went on from its own state, as if nothing happened.
    assert replies(scripted) == replies(plain)


def test_state_out_is_checked_before_the_model_loads(preset, tmp_path, capsys):
    bad = tmp_path / "missing" / "s.npz"
    args = ["generate", "--preset", preset, "--state-out", str(bad), "Hi"]
    assert main(args) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, gpu, want",
    [
        (None, True, True),
        (None, False, False),
        (False, True, False),
        (True, False, True),
    ],
)
def test_jit_compile_on_torch_by_default_with_a_gpu(
    flag, gpu, want, monkeypatch, caplog
):
    """`--jit-compile`: on torch, compiled decoding by default where a CUDA
    GPU is (eager torch decodes ~30x slower there), with a line saying the
    first token waits; elsewhere Keras's default."""
    import argparse

    import keras

    from keras_rwkv.cli import _torch_jit_compile

    args = argparse.Namespace(jit_compile=flag)
    if keras.config.backend() != "torch":
        assert _torch_jit_compile(args) == "auto"
        return
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    with caplog.at_level("WARNING", logger="keras_rwkv"):
        assert _torch_jit_compile(args) is want
    assert ("the first token waits" in caplog.text) == want


def test_jit_compile_flag_reaches_the_compile(preset, capsys, monkeypatch):
    from keras_rwkv import cli

    seen = []
    decide = cli._torch_jit_compile

    def record(args):
        seen.append(args.jit_compile)
        return decide(args)

    monkeypatch.setattr(cli, "_torch_jit_compile", record)
    assert (
        main(
            [
                "generate",
                "--preset",
                preset,
                "--max-new-tokens",
                "2",
                "--no-jit-compile",
                *GREEDY,
                "Hi",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("Hi")
    assert seen == [False]
