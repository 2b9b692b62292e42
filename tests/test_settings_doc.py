"""Every KERAS_RWKV_* environment variable the package reads is in the
one table of docs/settings.md (and the table names no variable that does
not exist)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAME = re.compile(r"KERAS_RWKV_[A-Z0-9_]*[A-Z0-9]")
# C preprocessor macros that share the prefix (not environment variables).
NOT_VARIABLES = {"KERAS_RWKV_WKV6_CASE"}


def test_every_environment_variable_is_documented_once():
    used = set()
    for path in (ROOT / "keras_rwkv").rglob("*"):
        if path.suffix in (".py", ".cu", ".cuh"):
            used |= set(NAME.findall(path.read_text(encoding="utf-8")))
    used -= NOT_VARIABLES
    table = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    documented = set()
    for row in rows:
        documented |= set(NAME.findall(row.split("|")[1]))
    assert used, "no variables found: the pattern is wrong"
    assert used - documented == set(), "undocumented variables"
    assert documented - used == set(), "documented variables nobody reads"


def test_the_environment_is_read_in_settings_only():
    # entry.py sets KERAS_BACKEND for the command line (Keras's variable).
    allowed = {"utils/settings.py", "entry.py"}
    readers = set()
    for path in (ROOT / "keras_rwkv").rglob("*"):
        if path.suffix in (".py", ".cu", ".cuh"):
            text = path.read_text(encoding="utf-8")
            if "os.environ" in text or "getenv" in text:
                readers.add(path.relative_to(ROOT / "keras_rwkv").as_posix())
    assert readers - allowed == set()
