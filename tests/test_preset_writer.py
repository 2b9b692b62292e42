"""write_preset and `convert --overwrite` never lose anything: they replace
only a keras-rwkv preset, never the input's directory or the current one,
leave alone what appears meanwhile, and serialise concurrent writers."""

import json
import os
import threading
import time

import pytest

from keras_rwkv.cli import main as cli_main
from keras_rwkv.convert import PresetWriteError
from keras_rwkv.convert import write_preset


class FakePreset:
    """Writes what a keras-rwkv preset holds; optionally slowly, or with
    a hook run in the middle of the write."""

    def __init__(self, tag, seconds=0.0, during=None):
        self.tag, self.seconds, self.during = tag, seconds, during

    def save_to_preset(self, path):
        config = {"registered_name": "keras_rwkv>RWKV6Backbone"}
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({**config, "tag": self.tag}, f)
        if self.during:
            self.during()
        time.sleep(self.seconds)
        with open(os.path.join(path, "model.weights.h5"), "w") as f:
            f.write(self.tag)


def tag_of(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)["tag"]


def hidden(directory):
    return sorted(p.name for p in directory.iterdir() if p.name[0] == ".")


def test_overwrite_replaces_a_preset_of_ours(tmp_path):
    out = tmp_path / "out"
    write_preset(FakePreset("a"), out)
    with pytest.raises(PresetWriteError, match="already exists"):
        write_preset(FakePreset("b"), out)
    assert tag_of(out) == "a"
    write_preset(FakePreset("b"), out, overwrite=True)
    assert tag_of(out) == "b"
    assert hidden(tmp_path) == []  # no temp dir, no lock file left


def test_overwrite_refuses_the_inputs_directory(tmp_path, capsys):
    directory = tmp_path / "d"
    directory.mkdir()
    source = directory / "model.pth"
    source.write_bytes(b"weights")
    (directory / "notes.txt").write_text("mine")
    args = ["convert", str(source), str(directory), "--overwrite"]
    assert cli_main(args) == 2
    assert "holds the input" in capsys.readouterr().err
    assert source.read_bytes() == b"weights"
    assert (directory / "notes.txt").read_text() == "mine"


def test_overwrite_refuses_the_current_directory_and_its_parents(
    tmp_path, monkeypatch, capsys
):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("x")
    monkeypatch.chdir(work)
    for target in (".", ".."):
        assert cli_main(["convert", "x.pth", target, "--overwrite"]) == 2
        assert "current directory" in capsys.readouterr().err
    assert (work / "keep.txt").read_text() == "x"


def test_overwrite_refuses_a_directory_with_other_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "photo.jpg").write_text("precious")
    with pytest.raises(PresetWriteError, match="not a keras-rwkv preset"):
        write_preset(FakePreset("a"), out, overwrite=True)
    assert (out / "photo.jpg").read_text() == "precious"
    # ... and a preset of another model.
    other = tmp_path / "gemma"
    other.mkdir()
    (other / "config.json").write_text(
        json.dumps({"registered_name": "keras_hub>GemmaBackbone"})
    )
    with pytest.raises(PresetWriteError, match="GemmaBackbone"):
        write_preset(FakePreset("a"), other, overwrite=True)
    assert hidden(tmp_path) == []


def test_a_directory_appearing_mid_write_survives(tmp_path):
    out = tmp_path / "out"

    def someone_else():
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")

    with pytest.raises(PresetWriteError, match="appeared while"):
        write_preset(FakePreset("a", during=someone_else), out)
    assert (out / "theirs.txt").read_text() == "theirs"
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    # With overwrite, a foreign directory that appears is kept too.
    os.remove(out / "theirs.txt")
    out.rmdir()
    with pytest.raises(PresetWriteError, match="not a keras-rwkv preset"):
        write_preset(FakePreset("a", during=someone_else), out, overwrite=True)
    assert (out / "theirs.txt").read_text() == "theirs"
    assert hidden(tmp_path) == []


def test_concurrent_writers_serialise(tmp_path):
    out = tmp_path / "out"
    errors = []

    def write(tag, seconds):
        try:
            write_preset(FakePreset(tag, seconds), out)
        except PresetWriteError as e:
            errors.append((tag, str(e)))

    first = threading.Thread(target=write, args=("first", 1.0))
    first.start()
    time.sleep(0.2)  # the first holds the lock
    second = threading.Thread(target=write, args=("second", 0.0))
    second.start()
    first.join()
    second.join()
    # One valid preset (the first), and a clear error for the second.
    assert tag_of(out) == "first"
    assert (out / "model.weights.h5").read_text() == "first"
    assert len(errors) == 1 and errors[0][0] == "second"
    assert "already exists" in errors[0][1]
    assert hidden(tmp_path) == []


def test_stale_temp_dirs_of_a_killed_writer_are_swept(tmp_path):
    stale = tmp_path / ".keras_rwkv-out-abc123"
    stale.mkdir()
    (stale / "model.weights.h5").write_text("half")
    unrelated = tmp_path / ".keras_rwkv-other-xyz"
    unrelated.mkdir()
    write_preset(FakePreset("a"), tmp_path / "out")
    assert not stale.exists()
    assert unrelated.exists()  # another target's: not ours to judge
