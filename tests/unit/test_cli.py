from __future__ import annotations

import io
import json
from typing import Any

import pytest

from plugin.cli import Exit, main
from plugin.client import find_socket


class FakeClient:
    def __init__(self, replies: dict[str, tuple[int, dict[str, Any]]]) -> None:
        self.replies = replies
        self.calls: list[tuple[str, Any]] = []

    def call(self, endpoint: str, body=None):
        self.calls.append((endpoint, body))
        return self.replies[endpoint]


VOLUMES = {"Volumes": [{"name": "db", "used_bytes": 1536, "quota_bytes": 1 << 30, "mounts": 1,
                        "created": "2026-11-29T07:33:23Z", "options": {"size": "1G"}},
                       {"name": "x", "used_bytes": None, "quota_bytes": None, "mounts": 0,
                        "created": "2026-11-29T07:33:24Z", "options": {}}], "Err": ""}


def run(argv, replies, environ=None, calls=None):
    out, err = io.StringIO(), io.StringIO()
    client = FakeClient(replies)
    code = main(argv, stdout=out, stderr=err, environ=environ or {"SNAPVOL_SOCKET": "/s"},
                connect=lambda path: client)
    if calls is not None:
        calls.extend(client.calls)
    return code, out.getvalue(), err.getvalue()


SNAPS = {"Snapshots": [{"volume": "db", "name": "s1", "created": "2026-11-29T07:33:23Z",
                        "identity": "ab", "owner": "user", "kept_for": "origin of clone c1"},
                       {"volume": "db", "name": "send-x", "created": "2026-11-29T07:34:00Z",
                        "identity": "cd", "owner": "send", "kept_for": None}], "Err": ""}


@pytest.mark.parametrize("argv, endpoint, body", [
    (["snapshot", "create", "db", "web", "--name", "s1"], "Snapvol.SnapshotCreate",
     {"Volumes": ["db", "web"], "Name": "s1", "Quiesce": "none"}),
    (["snapshot", "create", "db", "--quiesce", "pause"], "Snapvol.SnapshotCreate",
     {"Volumes": ["db"], "Name": None, "Quiesce": "pause"}),
    (["prune"], "Snapvol.Prune", {"Volume": None, "DryRun": False}),
    (["resume-token", "db"], "Snapvol.ResumeToken", {"Volume": "db"}),
    (["prune", "db", "--dry-run", "--json"], "Snapvol.Prune", {"Volume": "db", "DryRun": True}),
    (["snapshot", "ls", "db"], "Snapvol.SnapshotList", {"Volume": "db"}),
    (["snapshot", "rm", "db", "s1"], "Snapvol.SnapshotRemove", {"Volume": "db", "Snapshot": "s1"}),
    (["rollback", "db", "s1"], "Snapvol.Rollback",
     {"Volume": "db", "Snapshot": "s1", "DestroyNewer": False}),
    (["rollback", "db", "s1", "--destroy-newer"], "Snapvol.Rollback",
     {"Volume": "db", "Snapshot": "s1", "DestroyNewer": True}),
])
def test_snapshot_commands_send_the_right_request(argv, endpoint, body):
    calls: list = []
    code, out, err = run(argv, {endpoint: (200, SNAPS)}, calls=calls)
    assert code == Exit.OK and err == "" and calls == [(endpoint, body)]


def test_snapshot_ls_table_and_json():
    code, out, _ = run(["snapshot", "ls", "db"], {"Snapvol.SnapshotList": (200, SNAPS)})
    assert out.splitlines() == [
        "VOLUME  SNAPSHOT  CREATED               OWNER  KEPT FOR",
        "db      s1        2026-11-29T07:33:23Z  user   origin of clone c1",
        "db      send-x    2026-11-29T07:34:00Z  send"]
    code, out, _ = run(["snapshot", "ls", "db", "--json"], {"Snapvol.SnapshotList": (200, SNAPS)})
    assert json.loads(out) == SNAPS


def test_ls_table():
    code, out, err = run(["ls"], {"Snapvol.Volumes": (200, VOLUMES)})
    assert code == Exit.OK and err == ""
    assert out.splitlines() == [
        "NAME  USED  QUOTA  MOUNTS  CREATED               OPTIONS",
        "db    1.5K  1.0G   1       2026-11-29T07:33:23Z  size=1G",
        "x     -     -      0       2026-11-29T07:33:24Z  -",
    ]


@pytest.mark.parametrize("argv", [["--json", "ls"], ["ls", "--json"]])
def test_ls_json_either_position(argv):
    code, out, _ = run(argv, {"Snapvol.Volumes": (200, VOLUMES)})
    assert code == Exit.OK and json.loads(out) == VOLUMES


@pytest.mark.parametrize("status, expected", [(404, Exit.NOT_FOUND), (409, Exit.CONFLICT),
                                              (503, Exit.CONFLICT), (400, Exit.USAGE),
                                              (500, Exit.ERROR)])
def test_errors_go_to_stderr_with_exit_codes(status, expected):
    code, out, err = run(["status"], {"Snapvol.Status": (status, {"Err": "nope"})})
    assert (code, out, err) == (expected, "", "snapvol: nope\n")


def test_unreachable_socket():
    out, err = io.StringIO(), io.StringIO()
    code = main(["ls", "--socket", "/nonexistent/snapvol.sock"], stdout=out, stderr=err)
    assert code == Exit.UNREACHABLE and out.getvalue() == ""
    assert err.getvalue() == ("snapvol: cannot reach the plugin at /nonexistent/snapvol.sock: "
                              "No such file or directory\n")


def test_no_socket_found(monkeypatch, tmp_path):
    monkeypatch.setattr("plugin.client.LEGACY_SOCKET", str(tmp_path / "none.sock"))
    monkeypatch.setattr("plugin.client.MANAGED_SOCKETS", str(tmp_path / "*" / "snapvol.sock"))
    out, err = io.StringIO(), io.StringIO()
    assert main(["status"], stdout=out, stderr=err, environ={}) == Exit.UNREACHABLE
    assert "is the plugin running? (./scripts/run starts it)" in err.getvalue()


def test_usage_error_exit_code():
    code, out, err = run(["frobnicate"], {})
    assert code == Exit.USAGE


def test_find_socket(tmp_path, monkeypatch):
    assert find_socket({"SNAPVOL_SOCKET": "/x.sock"}) == "/x.sock"
    monkeypatch.setattr("plugin.client.LEGACY_SOCKET", str(tmp_path / "none.sock"))
    monkeypatch.setattr("plugin.client.MANAGED_SOCKETS", str(tmp_path / "*" / "snapvol.sock"))
    with pytest.raises(LookupError, match="is the plugin running"):
        find_socket({})
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "snapvol.sock").touch()
    assert find_socket({}) == str(tmp_path / "a" / "snapvol.sock")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "snapvol.sock").touch()
    with pytest.raises(LookupError, match="several snapvol plugins"):
        find_socket({})
    (tmp_path / "none.sock").touch()
    assert find_socket({}) == str(tmp_path / "none.sock")
