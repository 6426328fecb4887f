"""Send/receive through the HTTP layer (fake backend: tar streams), transfer slots, and the
replication base that retention must keep. The real streams are tested in the integration
(btrfs send/receive, zfs send/receive) and e2e tiers."""

from __future__ import annotations

import io
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from plugin import stream
from plugin.app import create_app
from plugin.errors import VolumeBusy
from plugin.history import AutoHistory, Replication, ReplicationLog
from plugin.locks import VolumeLocks
from plugin.mounts import MountTable
from plugin.domain import Domain
from tests.fakes import FakeBackend


@pytest.fixture
def domain(tmp_path: Path) -> Domain:
    backend = FakeBackend(tmp_path / "root")
    domain = Domain.assemble(backend, MountTable(tmp_path / "mounts.json"), VolumeLocks(0.5),
                             history=AutoHistory(tmp_path / "schedule.json"),
                             replications=ReplicationLog(tmp_path / "replication.json"),
                             transfers=1)
    domain.volumes.open()
    return domain


@pytest.fixture
def client(domain):
    return create_app(domain=domain).test_client()


def sent(client, body: dict) -> bytes:
    response = client.post("/Snapvol.Send", data=json.dumps(body).encode())
    assert response.status_code == 200, response.data
    assert response.headers["Content-Type"] == "application/vnd.snapvol.stream"
    return response.data


def reencoded(raw: bytes, **changes) -> bytes:
    """*raw* as a well-formed stream whose header says something else."""
    reader = stream.Reader(io.BytesIO(raw))
    header = {k: v for k, v in reader.header().items() if k != "format"}
    return b"".join(stream.encode({**header, **changes}, [b"".join(reader.data())]))


def receive(client, volume: str, raw: bytes) -> tuple[int, dict]:
    response = client.post(f"/Snapvol.Receive?Volume={volume}", data=raw)
    return response.status_code, json.loads(response.data)


def test_send_then_receive_makes_the_volume(client, domain):
    domain.volumes.create("db", {"mode": "700", "schedule": "1h"})
    (domain.volumes.path("db") / "table").write_text("rows")
    raw = sent(client, {"Volume": "db"})               # a snapshot is taken for it
    name = domain.volumes.snapshots("db")[0].name
    assert name.startswith("send-")
    status, reply = receive(client, "copy", raw)
    assert status == 200 and reply["Snapshot"] == name and reply["Bytes"] > 0
    assert (domain.volumes.path("copy") / "table").read_text() == "rows"
    assert domain.status.get("copy").status["options"] == {"mode": "700"}   # storage options only


@pytest.mark.parametrize("mangle, message", [
    (lambda raw: b"", "the stream is empty"),
    (lambda raw: raw[: len(raw) // 2], "truncated"),
    (lambda raw: raw[:-30] + bytes([raw[-30] ^ 1]) + raw[-29:], "corrupted"),
    (lambda raw: b"tar file, not ours", "not a snapvol stream"),
    (lambda raw: reencoded(raw, backend="zfs"),
     "the stream is from a zfs volume; this plugin stores volumes on btrfs"),
    (lambda raw: reencoded(raw, snapshot="../x"), "header is not acceptable"),
    (lambda raw: reencoded(raw, options={"mode": "99999"}), "header is not acceptable"),
])
def test_bad_streams_are_refused_and_leave_nothing(client, domain, mangle, message):
    domain.volumes.create("db", {})
    domain.volumes.snapshot(["db"], "s1")
    raw = sent(client, {"Volume": "db", "Snapshot": "s1"})
    status, reply = receive(client, "copy", mangle(raw))
    assert status == 400 and message in reply["Err"], reply
    assert [v.name for v in domain.volumes.list()] == ["db"]


def test_incremental_stream_needs_the_base_on_the_replica(client, domain):
    domain.volumes.create("db", {})
    domain.volumes.snapshot(["db"], "s1")
    domain.volumes.snapshot(["db"], "s2")
    raw = sent(client, {"Volume": "db", "Snapshot": "s2", "Since": "s1"})
    status, reply = receive(client, "nowhere", raw)
    assert status == 400 and "there is no volume nowhere here" in reply["Err"]
    domain.volumes.create("other", {})
    status, reply = receive(client, "other", raw)
    assert status == 400 and "volume other lacks the stream's base snapshot s1" in reply["Err"]


def test_send_errors_are_json_before_the_stream_starts(client, domain):
    domain.volumes.create("db", {})
    response = client.post("/Snapvol.Send", data=b'{"Volume": "db", "Snapshot": "nope"}')
    assert response.status_code == 404 and json.loads(response.data)["Err"] == "no such snapshot: db@nope"
    response = client.post("/Snapvol.Send", data=b'{"Volume": "../etc"}')
    assert response.status_code == 400


def test_transfer_slots_are_bounded_and_always_freed(domain):
    domain.volumes.create("db", {})
    domain.volumes.snapshot(["db"], "s1")
    first = domain.transfers.send("db", "s1")
    with pytest.raises(VolumeBusy, match="1 transfers are running already"):
        domain.transfers.send("db", "s1")
    first.close()                                      # never iterated: still freed
    second = domain.transfers.send("db", "s1")
    assert b"".join(second).startswith(stream.MAGIC)   # iterated to the end: freed
    domain.transfers.send("db", "s1").close()


def test_retention_never_prunes_a_replication_base_or_a_snapshot_being_sent(domain):
    backend = domain.backend
    now = datetime(2026, 6, 1, tzinfo=timezone.utc)
    domain.volumes.create("db", {"schedule": "1h", "keep": "last=1"})
    for hours in (3, 2, 1):
        backend.clock = lambda h=hours: now - timedelta(hours=h)
        backend.create_snapshot("db", f"auto-{hours}")
    domain.replications.record("db", Replication("ssh://standby", now, "auto-3"))
    transfer = domain.transfers.send("db", "auto-2")
    kept = {d["snapshot"]: d["reasons"] for d in domain.schedules.prune("db", now=now) if d["keep"]}
    assert kept == {"auto-3": ["protected"], "auto-2": ["protected"], "auto-1": ["newest", "last"]}
    transfer.close()
    kept = {d["snapshot"] for d in domain.schedules.prune("db", now=now) if d["keep"]}
    assert kept == {"auto-3", "auto-1"}


def test_a_refused_receive_leaves_no_trace(client, domain):
    """A receive refused because every transfer slot is busy must not leave the volume marked
    as being received: the next receive and Mount work as if it had never been tried."""
    domain.volumes.create("db", {})
    domain.volumes.snapshot(["db"], "s1")
    full = sent(client, {"Volume": "db", "Snapshot": "s1"})
    blocker = domain.transfers.send("db", "s1")                 # takes the only slot
    status, reply = receive(client, "copy", full)
    assert status == 503 and "transfers are running already" in reply["Err"], reply
    blocker.close()
    assert [v.name for v in domain.volumes.list()] == ["db"]
    status, reply = receive(client, "copy", full)
    assert status == 200, reply
    domain.volumes.mount("copy", "a" * 64)
    assert [s.name for s in domain.volumes.snapshots("copy")] == ["s1"]


def test_rollback_is_refused_while_the_volume_is_being_sent(domain):
    """A rollback would replace (Btrfs) or destroy newer snapshots (ZFS) under a running send."""
    domain.volumes.create("db", {})
    domain.volumes.snapshot(["db"], "s1")
    domain.volumes.snapshot(["db"], "s2")
    transfer = domain.transfers.send("db", "s2", "s1")
    with pytest.raises(VolumeBusy, match="volume db is being sent"):
        domain.volumes.rollback("db", "s1", destroy_newer=True)
    transfer.close()
    domain.volumes.rollback("db", "s1", destroy_newer=True)


def test_a_replica_mounted_during_the_receive_check_is_never_overwritten(client, domain,
                                                                         monkeypatch):
    """Mount racing an incremental receive: either the Mount waits or is refused, or the
    receive is refused; never both succeed (the container would see its volume replaced)."""
    import threading

    domain.volumes.create("db", {})
    domain.volumes.snapshot(["db"], "s1")
    full = sent(client, {"Volume": "db", "Snapshot": "s1"})
    assert receive(client, "copy", full)[0] == 200
    backend = domain.backend
    for snap in backend.snapshots("copy"):        # the fake keeps no received identity
        backend._snapshots["copy"][snap.name] = snap.__class__(
            snap.volume, snap.name, snap.created, snap.identity,
            domain.volumes.snapshots("db")[0].identity)
    domain.volumes.snapshot(["db"], "s2")
    incremental = sent(client, {"Volume": "db", "Snapshot": "s2", "Since": "s1"})
    mounted: list[object] = []
    real_users = domain.mounts.users

    def users_while_a_container_starts(volume):
        answer = real_users(volume)
        if volume == "copy" and not mounted:
            def start():
                try:
                    mounted.append(domain.volumes.mount("copy", "c" * 64))
                except Exception as exc:              # refused or timed out: fine
                    mounted.append(exc)
            worker = threading.Thread(target=start)
            worker.start()
            worker.join(2)
        return answer

    monkeypatch.setattr(domain.mounts, "users", users_while_a_container_starts)
    status, reply = receive(client, "copy", incremental)
    mount_ok = not isinstance(mounted[0], Exception)
    assert not (mount_ok and status == 200), (mounted, reply)


def test_create_waits_for_a_receive_of_the_same_name(domain):
    """A full receive makes the volume after its snapshot: a Create of that name meanwhile
    would find a snapshot without its volume (and clear it as an orphan)."""
    with domain.inflight.receiving_into("copy"):
        with pytest.raises(VolumeBusy, match="volume copy is being received"):
            domain.volumes.create("copy", {})
    domain.volumes.create("copy", {})
