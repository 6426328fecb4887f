"""The self-contained ``snapvol`` command of plugin-only hosts needs nothing but python3."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from plugin import __version__
from plugin.cli_bundle import MODULES, bundle, write_bundle

REPO = Path(__file__).resolve().parents[2]
# Debian's python3 with no site-packages at all (-I -S): the standard library only
BARE_PYTHON = ["/usr/bin/python3", "-I", "-S"]


def test_the_bundle_holds_exactly_what_the_cli_imports():
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import plugin.cli, json; "
             "print(json.dumps(sorted(m for m in sys.modules if m.startswith('plugin'))))")
    out = subprocess.run([*BARE_PYTHON, "-c", probe, str(REPO)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    loaded = {m.removeprefix("plugin").lstrip(".") or "__init__" for m in json.loads(out)}
    assert loaded == set(MODULES)


def test_the_bundle_runs_on_a_bare_python(tmp_path: Path):
    path = tmp_path / "bin" / "snapvol"
    write_bundle(path)
    assert path.stat().st_mode & 0o777 == 0o755
    assert path.read_bytes() == bundle()
    assert not [p for p in path.parent.iterdir() if p.name != "snapvol"]   # no temporary left
    version = subprocess.run([*BARE_PYTHON, str(path), "--version"], capture_output=True,
                             text=True, timeout=60)
    assert (version.returncode, version.stdout.strip()) == (0, f"snapvol {__version__}")
    # no plugin behind the socket: the CLI's own message and exit code, not a traceback
    down = subprocess.run([*BARE_PYTHON, str(path), "--socket", str(tmp_path / "none.sock"),
                           "status"], capture_output=True, text=True, timeout=60)
    assert down.returncode != 0 and "Traceback" not in down.stderr, down.stderr
    assert "none.sock" in down.stderr


def test_a_rewrite_replaces_the_file_in_one_step(tmp_path: Path):
    path = tmp_path / "snapvol"
    path.write_text("old")
    held = path.open("rb")                      # a snapvol running from the old one
    write_bundle(path)
    assert held.read() == b"old" and path.read_bytes() == bundle()
    held.close()
