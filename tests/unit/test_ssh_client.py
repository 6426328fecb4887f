"""Where the ssh client's key and known_hosts come from, and what makes ssh unusable here."""

from __future__ import annotations

from pathlib import Path

import pytest

from plugin import ssh_client
from plugin.ssh_client import SshClient
from plugin.targets import Target

TARGET = Target.parse("ssh://root@nodeb:2222/run/p.sock")


def option(argv: list[str], name: str) -> str | None:
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-o" and argv[i + 1].startswith(name + "=")]
    return values[0].split("=", 1)[1] if values else None


def test_explicit_settings_win(tmp_path: Path):
    (tmp_path / "id_ed25519").write_text("k")
    client = SshClient("/keys/mine", "/keys/known", tmp_path)
    argv = client.argv(TARGET, "receive", "vol")
    assert argv[argv.index("-i") + 1] == "/keys/mine"
    assert option(argv, "UserKnownHostsFile") == "/keys/known"
    assert argv[-2:] == ["root@nodeb", "snapvol --socket /run/p.sock receive vol"]
    assert argv[argv.index("-p") + 1] == "2222"


def test_the_directory_is_looked_up_at_each_connection(tmp_path: Path):
    client = SshClient(directory=tmp_path)
    assert "-i" not in client.argv(TARGET, "status")            # no key there yet
    assert option(client.argv(TARGET, "status"), "UserKnownHostsFile") == str(tmp_path / "known_hosts")
    (tmp_path / "id_rsa").write_text("k")
    (tmp_path / "id_ed25519").write_text("k")                  # preferred over id_rsa
    argv = client.argv(TARGET, "status")
    assert argv[argv.index("-i") + 1] == str(tmp_path / "id_ed25519")


def test_without_a_directory_ssh_defaults_apply():
    argv = SshClient().argv(TARGET, "status")
    assert "-i" not in argv and option(argv, "UserKnownHostsFile") == "/root/.ssh/known_hosts"


def test_remote_words_are_quoted_one_by_one():
    argv = SshClient(remote_snapvol="/opt/snapvol").argv(Target.parse("ssh://h"), "call", '{"a": "$(x)"}')
    assert argv[-1] == """/opt/snapvol call '{"a": "$(x)"}'"""


def test_unusable_names_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    known = tmp_path / "known_hosts"
    client = SshClient(directory=tmp_path)
    assert "no known_hosts file" in client.unusable() and str(tmp_path) in client.unusable()
    known.write_text("")
    assert client.unusable() is None
    assert "cannot be read" in SshClient(key=str(tmp_path / "nokey"), known_hosts=str(known)).unusable()
    monkeypatch.setattr(ssh_client.shutil, "which", lambda name: None)
    assert "no ssh client" in client.unusable()
