"""Validated restores without Docker: the options and the label, the check's argv, the
verifier on the fake backend with fake checks (clone always gone, results recorded, the
newest passed snapshot kept by retention, records moved by the trash), the schedule, and the
CLI's output and exit codes against a canned plugin socket."""

from __future__ import annotations

import io
import json
import logging
import socketserver
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from plugin import options, verify_spec
from plugin.cli import main
from plugin.cli_render import render_snapshots
from plugin.domain import Domain
from plugin.errors import InvalidOption, InvalidRequest, SnapshotNotFound, VolumeBusy
from plugin.history import AutoHistory
from plugin.locks import VolumeLocks
from plugin.mounts import MountTable
from plugin.trash_book import TrashBook
from plugin.verify import Outcome, Use, VerifyUnavailable
from plugin.verify_book import ERROR, FAILED, PASSED, VerifyBook
from plugin.verify_spec import CheckSpec
from tests.fakes import FakeBackend

T0 = datetime(2026, 12, 1, tzinfo=timezone.utc)


# ---------------------------------------------------------------------- options and label

def test_verify_options_are_validated_and_kept():
    opts = options.validate({"verify": "1d", "verify-image": "postgres:16",
                             "verify-cmd": "builtin:sha256sum sums/SHA256SUMS",
                             "verify-path": "/var/lib/postgresql/data", "verify-timeout": "30m",
                             "verify-network": "none"}, "btrfs")
    assert opts["verify-cmd"] == "builtin:sha256sum sums/SHA256SUMS"
    assert options.validate({"from": "a@s", "verify": "1h"}, "zfs") == {"from": "a@s", "verify": "1h"}


@pytest.mark.parametrize("key,value,message", [
    ("verify", "0s", "must be from 1s to 1y"),
    ("verify-cmd", "builtin:mysql", "unknown builtin 'builtin:mysql'"),
    ("verify-cmd", "builtin:postgres --all", "builtin:postgres takes no arguments"),
    ("verify-cmd", "builtin:sha256sum ../etc/shadow", "must be a relative path inside the volume"),
    ("verify-cmd", "sh -c 'unclosed", "cannot be split into words (No closing quotation)"),
    ("verify-cmd", "  ", "must not be empty"),
    ("verify-image", "postgres 16", "must be an image reference"),
    ("verify-image", "-rm", "must be an image reference"),
    ("verify-path", "data", "must be an absolute path other than /"),
    ("verify-path", "/", "must be an absolute path other than /"),
    ("verify-path", "/data/../etc", "must be an absolute path other than /"),
    ("verify-timeout", "25h", "must be from 1s to 24h"),
    ("verify-network", "host", "must be one of none, bridge"),
])
def test_bad_verify_options_are_refused_naming_the_option(key, value, message):
    with pytest.raises(InvalidOption) as err:
        options.validate({key: value}, "btrfs")
    assert str(err.value).startswith(f"option {key}=")
    assert message in str(err.value)


def test_the_label_is_an_image_and_a_command_or_a_builtin():
    assert verify_spec.parse_label("builtin:postgres") == (None, "builtin:postgres")
    assert verify_spec.parse_label("app:1 app fsck 'a b'") == ("app:1", "app fsck 'a b'")
    assert verify_spec.parse_label("app:1") == ("app:1", None)
    for bad in ("", "app:1 'x", "builtin:nope"):
        with pytest.raises(ValueError):
            verify_spec.parse_label(bad)


def test_the_check_container_gets_argv_lists_with_user_values_as_arguments_only():
    path = "/data/$(rm -rf /)"                  # never interpolated into the script
    entry, cmd, workdir = CheckSpec(command="builtin:postgres").container(path)
    assert entry[:2] == ["sh", "-c"] and entry[2] == verify_spec.POSTGRES_SCRIPT
    assert entry[3:] == ["snapvol-verify", path] and cmd == [] and workdir is None
    assert path not in entry[2]
    assert CheckSpec(command="builtin:sha256sum").container("/d") == (
        ["sha256sum", "-c", "SHA256SUMS"], [], "/d")
    assert CheckSpec(command="check --deep 'a b'").container("/d") == (
        None, ["check", "--deep", "a b"], None)
    assert CheckSpec(image="x").container("/d") == (None, None, None)


# ---------------------------------------------------------------------- the verifier

class FakeChecks:
    """Records each check; answers what the test says (an Outcome or an exception)."""

    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend
        self.answer: Outcome | Exception = Outcome(0, "all fine")
        self.use: Use | None = Use("db", "postgres:15", "/var/lib/postgresql/data")
        self.runs: list = []
        self.leftovers = 0

    def usage(self, volume):
        return self.use

    def run(self, check):
        # the clone exists while the check runs, and is not the volume
        assert check.clone in {v.name for v in self.backend.internal_volumes()}
        assert (check.source / "f").read_text() == "snapshotted"
        self.runs.append(check)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def remove_leftovers(self):
        return self.leftovers


@pytest.fixture
def world(tmp_path: Path):
    backend = FakeBackend(tmp_path / "root")
    checks = FakeChecks(backend)
    domain = Domain.assemble(backend, MountTable(tmp_path / "mounts.json"), VolumeLocks(0.5),
                             history=AutoHistory(tmp_path / "schedule.json"),
                             trash=TrashBook(tmp_path / "trash.journal"), trash_ttl=3600,
                             verify_book=VerifyBook(tmp_path / "verify.json"), checks=checks)
    domain.volumes.open()
    domain.volumes.create("db", {"verify-cmd": "builtin:postgres"})
    (backend.volume("db").mountpoint / "f").write_text("snapshotted")
    domain.volumes.snapshot(["db"], "s1")
    (backend.volume("db").mountpoint / "f").write_text("later")
    return domain, backend, checks


def test_a_passing_check_is_recorded_and_its_clone_removed(world, tmp_path):
    domain, backend, checks = world
    result = domain.verifier.verify("db")
    assert (result.result, result.snapshot, result.image) == (PASSED, "s1", "postgres:15")
    assert result.message == "all fine" and result.command == "builtin:postgres"
    [run] = checks.runs
    assert run.path == "/var/lib/postgresql/data" and run.network == "none" and run.timeout == 600
    assert backend.internal_volumes() == []
    saved = json.loads((tmp_path / "verify.json").read_text())["db"]
    assert saved["last"]["result"] == saved["passed"]["result"] == "passed"
    assert VerifyBook(tmp_path / "verify.json").passed("db").snapshot == "s1"   # read back
    row = domain.status.get("db").status["verify"]
    assert row["last"]["result"] == "passed" and row["passed"]["snapshot"] == "s1"
    listed = domain.status.snapshots("db")
    assert listed[0]["verified"] and listed[0]["kept_for"] == "newest verified restore point"
    assert "passed" in render_snapshots({"Snapshots": listed})
    assert domain.status.describe()["verifications"]["db"]["result"] == "passed"


@pytest.mark.parametrize("answer,kind,message", [
    (Outcome(3, "ERROR: could not read block 0"), FAILED,
     "ERROR: could not read block 0\nthe check exited 3"),
    (Outcome(None, "still checking"), FAILED,
     "still checking\nthe check did not finish within 10m and was killed"),
    (VerifyUnavailable("docker said no"), ERROR, "docker said no"),
])
def test_failures_timeouts_and_errors_are_recorded_and_the_clone_always_goes(world, answer, kind, message):
    domain, backend, checks = world
    checks.answer = answer
    result = domain.verifier.verify("db@s1".partition("@")[0], "s1")
    assert (result.result, result.message) == (kind, message)
    assert backend.internal_volumes() == []
    assert domain.verifier.book.passed("db") is None
    assert domain.lifecycle.needs("db") == {}             # nothing pinned any more


def test_what_runs_command_line_over_options_over_label_over_the_container(world):
    domain, backend, checks = world
    checks.use = Use("db", "postgres:15", "/pg", label="checker:2 check --all")
    spec = domain.verifier.resolve(backend.volume("db"))
    assert (spec.image, spec.command, spec.path) == ("checker:2", "builtin:postgres", "/pg")
    spec = domain.verifier.resolve(backend.volume("db"), CheckSpec(image="i:1", path="/x",
                                                                   timeout="5s"))
    assert (spec.image, spec.command, spec.path, spec.timeout) == ("i:1", "builtin:postgres", "/x", "5s")
    checks.use = None                          # no container uses it: the image is required
    with pytest.raises(InvalidRequest, match="no image to check volume db"):
        domain.verifier.resolve(backend.volume("db"))
    domain.volumes.create("plain", None)
    with pytest.raises(InvalidRequest, match="nothing says how to check volume plain"):
        domain.verifier.resolve(backend.volume("plain"))
    spec = domain.verifier.resolve(backend.volume("plain"), CheckSpec(image="mine:1"))
    assert (spec.image, spec.command, spec.path) == ("mine:1", None, "/data")


def test_bad_requests_are_refused_before_anything_is_made(world):
    domain, backend, checks = world
    domain.volumes.create("empty", None)
    with pytest.raises(InvalidRequest, match="volume empty has no snapshot to verify"):
        domain.verifier.verify("empty")
    with pytest.raises(SnapshotNotFound):
        domain.verifier.verify("db", "nope")
    domain.verifier._running.add("db")
    with pytest.raises(VolumeBusy):
        domain.verifier.verify("db")
    assert checks.runs == [] and backend.internal_volumes() == []
    assert domain.verifier.book.volumes() == set()


def test_retention_never_prunes_the_newest_snapshot_that_passed(world):
    domain, backend, checks = world
    domain.volumes.create("auto", {"schedule": "1h", "keep": "last=1", "verify-image": "x:1"})
    (backend.volume("auto").mountpoint / "f").write_text("snapshotted")
    for hour in range(3):
        domain.schedules.run_automatic("auto", T0 + timedelta(hours=hour))
    first = backend.snapshots("auto")[-1].name
    domain.verifier.verify("auto")                          # the newest passes
    for hour in range(3, 6):
        domain.schedules.run_automatic("auto", T0 + timedelta(hours=hour))
    left = [s.name for s in backend.snapshots("auto")]
    assert left == [first, backend.snapshots("auto")[-1].name]      # last=1, and the verified
    checks.answer = Outcome(1, "broken")
    domain.verifier.verify("auto")                          # a failure protects nothing new
    domain.schedules.run_automatic("auto", T0 + timedelta(hours=7))
    assert first in [s.name for s in backend.snapshots("auto")]


def test_results_move_with_the_trash_and_go_with_a_purge(world):
    domain, backend, checks = world
    domain.verifier.verify("db")
    domain.volumes.remove("db")
    [entry] = domain.trash.entries()
    assert domain.verifier.book.volumes() == {entry.internal}
    domain.trash.restore("db")
    assert domain.verifier.book.passed("db").volume == "db"
    domain.volumes.remove("db")
    domain.trash.purge("db")
    assert domain.verifier.book.volumes() == set()


def test_start_up_removes_leftover_containers_then_clones(world):
    domain, backend, checks = world
    backend.clone("db", "s1", "snapvol.verify.0123456789ab", {})
    backend.clone("db", "s1", "snapvol.other.1", {})          # not a verify clone: kept
    checks.leftovers = 1
    domain.verifier._running.add("db")              # a verification running: not leftovers
    assert domain.verifier.recover() is False
    assert len(backend.internal_volumes()) == 2
    domain.verifier._running.clear()
    assert domain.verifier.recover() is True
    assert [v.name for v in backend.internal_volumes()] == ["snapvol.other.1"]

    def unreachable():
        raise VerifyUnavailable("no docker")
    checks.remove_leftovers = unreachable
    backend.clone("db", "s1", "snapvol.verify.0123456789ab", {})
    assert domain.verifier.recover() is False                 # a container may still use it
    assert "snapvol.verify.0123456789ab" in [v.name for v in backend.internal_volumes()]


def test_a_docker_that_cannot_be_asked_is_warned_about_once_not_on_every_wake(world, caplog):
    domain, backend, checks = world

    def unreachable():
        raise VerifyUnavailable("no docker")
    checks.remove_leftovers = unreachable
    with caplog.at_level(logging.DEBUG, logger="plugin.verify"):
        for _ in range(3):
            assert domain.verifier.recover() is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no docker" in warnings[0].getMessage()
    assert sum("no docker" in r.getMessage() for r in caplog.records) == 3   # the rest: debug

    def other():
        raise VerifyUnavailable("permission denied")
    checks.remove_leftovers = other
    caplog.clear()
    assert domain.verifier.recover() is False          # a new reason is a warning again
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


def test_scheduled_verifications_run_when_due(world):
    domain, backend, checks = world
    verifier = domain.verifier
    domain.volumes.create("sched", {"verify": "1h", "verify-image": "x:1"})
    created = backend.volume("sched").created
    assert verifier.next_due() == created + timedelta(hours=1)
    assert verifier.run_due(created + timedelta(minutes=59)) == []
    (backend.volume("sched").mountpoint / "f").write_text("snapshotted")
    domain.volumes.snapshot(["sched"], "s1")
    verifier._clock = lambda: created + timedelta(hours=1)
    assert verifier.run_due(created + timedelta(hours=1)) == ["sched"]
    for thread in [t for t in threading.enumerate() if t.name == "snapvol-verify-sched"]:
        thread.join(10)
    assert verifier.book.last("sched").result == PASSED
    assert verifier.next_due() == created + timedelta(hours=2)


def test_refused_without_checks_or_with_a_refusal(tmp_path):
    backend = FakeBackend(tmp_path / "root")
    domain = Domain.assemble(backend, MountTable(tmp_path / "m.json"), VolumeLocks(0.5),
                             verify_book=VerifyBook(tmp_path / "v.json"), checks=FakeChecks(backend),
                             verify_refusal="snapvol verify needs a host install")
    domain.volumes.open()
    with pytest.raises(VerifyUnavailable, match="needs a host install"):
        domain.verifier.verify("anything")


# ---------------------------------------------------------------------- the CLI

class CannedPlugin(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def serve(path: Path, status: int, body: bytes, content_type: str) -> CannedPlugin:
    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            length = 0
            while (line := self.rfile.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            server.requests.append(json.loads(self.rfile.read(length)))
            self.wfile.write(b"HTTP/1.1 %d X\r\nContent-Type: %s\r\nConnection: close\r\n\r\n"
                             % (status, content_type.encode()) + body)

    server = CannedPlugin(str(path), Handler)
    server.requests = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def verify_reply(result: str, message: str = "") -> bytes:
    row = {"volume": "db", "snapshot": "s1", "result": result, "started": "2026-12-01T00:00:00Z",
           "seconds": 4.2, "message": message, "image": "pg:15", "command": "builtin:postgres"}
    return (json.dumps({"Step": "cloning db@s1"}) + "\n"
            + json.dumps({"Err": "", "Verify": row}) + "\n").encode()


@pytest.mark.parametrize("body,code,shown", [
    (verify_reply("passed"), 0, "db@s1: PASSED in 4.2 s (pg:15 builtin:postgres)\n"),
    (verify_reply("failed", "FATAL: bad\nthe check exited 1"), 1,
     "db@s1: FAILED in 4.2 s (pg:15 builtin:postgres)\n  FATAL: bad\n  the check exited 1\n"),
    (verify_reply("error", "image pg:15 is not on this host"), 2,
     "db@s1: ERROR in 4.2 s (pg:15 builtin:postgres)\n  image pg:15 is not on this host\n"),
    (b'{"Err": "volume db is being verified already", "Status": 503}\n', 2, ""),
])
def test_cli_verify_prints_the_result_and_exits_by_it(tmp_path, body, code, shown):
    sock = tmp_path / "p.sock"
    server = serve(sock, 200, body, "application/x-ndjson")
    out, err = io.StringIO(), io.StringIO()
    try:
        assert main(["verify", "db@s1", "--timeout", "5m", "--socket", str(sock)],
                    stdout=out, stderr=err) == code
    finally:
        server.shutdown()
        server.server_close()
    assert out.getvalue() == shown
    assert server.requests == [{"Volume": "db", "Snapshot": "s1", "Image": None, "Cmd": None,
                                "Path": None, "Timeout": "5m"}]
    if not shown:
        assert err.getvalue() == "snapvol: volume db is being verified already\n"


def test_cli_verify_json_and_refusals_and_an_absent_plugin(tmp_path):
    sock = tmp_path / "p.sock"
    server = serve(sock, 200, verify_reply("passed"), "application/x-ndjson")
    out = io.StringIO()
    try:
        assert main(["verify", "db", "--json", "--socket", str(sock)], stdout=out,
                    stderr=io.StringIO()) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert json.loads(out.getvalue())["Verify"]["result"] == "passed"
    sock.unlink()
    server = serve(sock, 404, b'{"Err": "no such volume: db"}', "application/vnd.docker.plugins.v1+json")
    err = io.StringIO()
    try:
        assert main(["verify", "db", "--socket", str(sock)], stdout=io.StringIO(), stderr=err) == 2
    finally:
        server.shutdown()
        server.server_close()
    assert err.getvalue() == "snapvol: no such volume: db\n"
    err = io.StringIO()
    assert main(["verify", "db", "--socket", str(tmp_path / "none.sock")], stdout=io.StringIO(),
                stderr=err) == 2
    assert "cannot reach the plugin" in err.getvalue()


# ---------------------------------------------------------------------- the managed plugin

def test_docker_asks_for_an_active_scratch_clone_by_name_and_gets_its_path(world):
    from plugin.app import create_app
    domain, backend, checks = world
    client = create_app(domain=domain).test_client()

    def call(endpoint, body):
        response = client.post("/" + endpoint, data=json.dumps(body).encode())
        return response.status_code, json.loads(response.data)

    scratch = "snapvol.verify.00aa11bb22cc"
    assert call("VolumeDriver.Get", {"Name": scratch})[0] == 404     # not while none runs
    assert call("VolumeDriver.Mount", {"Name": scratch, "ID": "m1"})[0] == 404
    seen = {}

    def run(check):
        held, done = threading.Event(), threading.Event()

        def hold():         # the endpoints take no lock: they answer while another holds it
            with domain.locks.hold(check.clone, "db"):
                held.set()
                done.wait(10)
        threading.Thread(target=hold, daemon=True).start()
        held.wait(5)
        try:
            for endpoint in ("Create", "Get", "Path", "Mount", "Unmount", "Remove"):
                seen[endpoint] = call(f"VolumeDriver.{endpoint}", {"Name": check.clone, "ID": "m1"})
        finally:
            done.set()
        return Outcome(0, "ok")
    checks.run = run
    assert domain.verifier.verify("db").result == PASSED
    clone_path = seen["Path"][1]["Mountpoint"]
    assert clone_path.startswith(str(backend.root)) and "snapvol.verify." in clone_path
    assert seen["Get"] == (200, {"Volume": {"Name": seen["Get"][1]["Volume"]["Name"],
                                            "Mountpoint": clone_path}, "Err": ""})
    assert seen["Mount"] == (200, {"Mountpoint": clone_path, "Err": ""})
    assert all(seen[e] == (200, {"Err": ""}) for e in ("Create", "Unmount", "Remove"))
    assert backend.internal_volumes() == []                          # destroyed by the verifier
    for other in ("snapvol.verify.x", "snapvol.trash.00aa11bb22cc"):    # reserved, not scratch
        assert call("VolumeDriver.Remove", {"Name": other})[0] == 400
    names_listed = [v["Name"] for v in call("VolumeDriver.List", {})[1]["Volumes"]]
    assert not [n for n in names_listed if n.startswith("snapvol.")]


def test_the_managed_plugin_finds_its_id_in_mountinfo(tmp_path):
    from plugin.verify_docker import CheckCannotRun, plugin_id
    ident = "ab" * 32
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / / rw - overlay overlay rw\n"
        f"40 22 8:1 /var/lib/docker/plugins/{ident}/propagated-mount /mnt/volumes rw,relatime "
        "shared:5 - ext4 /dev/sda1 rw\n")
    assert plugin_id(Path("/mnt/volumes"), str(info)) == ident
    with pytest.raises(CheckCannotRun, match="no propagated mount at /mnt/other"):
        plugin_id(Path("/mnt/other"), str(info))
