"""zstd-compressed streams through the HTTP layer (fake backend: tar streams through the real
``zstd`` program): a round trip, and damaged or unreadable compressed streams refused with
nothing left behind; format 1 on request."""

from __future__ import annotations

import io
import json
import struct

import pytest

from plugin import stream
from tests.conftest import need
from tests.unit import test_transfers
from tests.unit.test_transfers import receive, reencoded, sent

# test_transfers' fixtures, bound here so pytest finds them (an assignment, not an import:
# pyflakes would call every test's argument a redefinition of an unused import)
client, domain = test_transfers.client, test_transfers.domain

@pytest.fixture(autouse=True)
def zstd_installed() -> None:
    need("zstd", root=False)                # Debian's zstd: fails under scripts/test


def volume_with_text(domain, name: str = "db") -> None:
    domain.volumes.create(name, {})
    (domain.volumes.path(name) / "table").write_text("row, row, row your boat\n" * 200_000)
    domain.volumes.snapshot([name], "s1")


def test_a_compressed_stream_is_smaller_and_makes_the_same_volume(client, domain):
    volume_with_text(domain)
    plain = sent(client, {"Volume": "db", "Snapshot": "s1"})
    packed = sent(client, {"Volume": "db", "Snapshot": "s1", "Compression": "zstd"})
    assert len(packed) < len(plain) / 20                  # 4.8 MB of repeated text
    header = stream.Reader(io.BytesIO(packed)).header()
    assert header["compression"] == "zstd" and header["format"] == 2
    status, reply = receive(client, "copy", packed)
    assert status == 200, reply
    assert (domain.volumes.path("copy") / "table").read_text() == "row, row, row your boat\n" * 200_000


def test_a_bit_flipped_in_a_compressed_stream_is_refused(client, domain):
    volume_with_text(domain)
    packed = bytearray(sent(client, {"Volume": "db", "Snapshot": "s1", "Compression": "zstd"}))
    packed[len(packed) // 2] ^= 0x08
    status, reply = receive(client, "copy", bytes(packed))
    assert status == 400 and "corrupted" in reply["Err"] and "nothing was kept" in reply["Err"], reply
    assert [v.name for v in domain.volumes.list()] == ["db"]


def test_compressed_data_zstd_cannot_read_is_refused(client, domain):
    """Every CRC right, but what was compressed is not zstd's: the decompressor's error, and
    nothing left."""
    volume_with_text(domain)
    plain = sent(client, {"Volume": "db", "Snapshot": "s1"})
    lying = reencoded(plain, compression="zstd")          # says zstd, carries a tar stream
    status, reply = receive(client, "copy", lying)
    assert status == 400 and "zstd data cannot be decompressed" in reply["Err"], reply
    assert [v.name for v in domain.volumes.list()] == ["db"]


def test_a_truncated_compressed_stream_is_refused(client, domain):
    volume_with_text(domain)
    packed = sent(client, {"Volume": "db", "Snapshot": "s1", "Compression": "zstd"})
    status, reply = receive(client, "copy", packed[: len(packed) - 30])
    assert status == 400 and "truncated" in reply["Err"], reply
    assert [v.name for v in domain.volumes.list()] == ["db"]


def test_unknown_compressions_are_refused(client, domain):
    volume_with_text(domain)
    response = client.post("/Snapvol.Send", data=json.dumps(
        {"Volume": "db", "Snapshot": "s1", "Compression": "rar"}).encode())
    assert response.status_code == 400
    assert json.loads(response.data)["Err"] == "unknown stream compression 'rar': use none or zstd"
    plain = sent(client, {"Volume": "db", "Snapshot": "s1"})
    status, reply = receive(client, "copy", reencoded(plain, compression="lz4"))
    assert status == 400 and "compressed with 'lz4', which this snapvol cannot decompress" in reply["Err"]


def test_format_1_on_request(client, domain):
    volume_with_text(domain)
    old = sent(client, {"Volume": "db", "Snapshot": "s1", "Format": 1})
    assert stream.Reader(io.BytesIO(old)).header()["format"] == 1
    assert struct.unpack(">cI", old[-45:-40]) == (b"Z", 40)  # SHA-256 + byte count, as 0.2 wrote
    status, reply = receive(client, "copy", old)
    assert status == 200, reply
    response = client.post("/Snapvol.Send", data=json.dumps(
        {"Volume": "db", "Snapshot": "s1", "Format": 3}).encode())
    assert response.status_code == 400


def replicate_to_replica(domain, tmp_path, monkeypatch, refusal, **options):
    """Replicate db@s1 (with the Replicator's *options*) to an in-process replica that reads
    every stream and refuses it in the words ``refusal(header)`` returns, if any; the run and
    the headers the replica saw."""
    from plugin import replication
    from plugin.errors import TransferFailed
    from plugin.history import ReplicationLog

    seen: list[dict] = []

    def replica(self, where, volume, chunks, progress):
        reader = stream.Reader(io.BytesIO(b"".join(chunks)))
        header = reader.header()
        seen.append(header)
        refused = refusal(header)
        if refused:
            raise TransferFailed(f"{where}: {refused}")
        b"".join(reader.data())
        return "received"

    monkeypatch.setattr(replication.Replicator, "_send_to", replica)
    monkeypatch.setattr(replication.Replicator, "_remote_snapshots", lambda self, where, volume: None)
    monkeypatch.setattr(replication.time, "sleep", lambda s: None)
    replicator = replication.Replicator(domain.volumes, domain.transfers, domain.lifecycle,
                                        ReplicationLog(tmp_path / "r.json"), **options)
    try:
        return replicator.replicate("db", "unix:///nowhere/plugin.sock", "s1"), seen
    finally:
        replicator.shutdown()


def test_a_target_that_reads_format_1_only_gets_format_1(domain, tmp_path, monkeypatch):
    """A replica of snapvol 0.2 refuses format 2 with its own words; the next attempt sends
    format 1, uncompressed (0.2 knows no compression)."""
    volume_with_text(domain)
    run, seen = replicate_to_replica(
        domain, tmp_path, monkeypatch, compression="zstd",
        refusal=lambda header: None if header["format"] == 1 else
        f"stream format {header['format']} is not supported (this snapvol reads format 1)")
    assert run.error is None and run.attempts == 2
    assert [(h["format"], h.get("compression")) for h in seen] == [(2, "zstd"), (1, None)]


def test_a_target_that_reads_formats_1_and_2_only_gets_format_2(domain, tmp_path, monkeypatch):
    """Where format 3 is the default (Btrfs), a replica that reads formats 1 and 2 only
    refuses it in its own words; the next attempt sends format 2, still compressed."""
    need(root=False, modules={"python3-xxhash": "xxh3" in stream.CHECKS})
    monkeypatch.setattr(domain.backend, "checked_streams", True)   # the fake, as Btrfs
    volume_with_text(domain)
    run, seen = replicate_to_replica(
        domain, tmp_path, monkeypatch,
        refusal=lambda header: "stream format 3 is not supported (this snapvol reads formats 1, 2)"
        if header["format"] == 3 else None)
    assert run.error is None and run.attempts == 2
    assert [h["format"] for h in seen] == [3, 2]


def test_a_zfs_target_from_before_format_3_for_zfs_gets_format_2(domain, tmp_path, monkeypatch):
    """A ZFS replica of a snapvol that reads format 3 but took it on Btrfs only refuses it
    in its own words (transfers.receive there); the next attempt sends format 2."""
    monkeypatch.setattr(domain.backend, "checked_streams", True)   # the fake, as ZFS now
    volume_with_text(domain)
    run, seen = replicate_to_replica(
        domain, tmp_path, monkeypatch,
        refusal=lambda header: "the stream (format 3) relies on the native receiver's checks, "
        "which zfs here does not make; send format 2" if header["format"] == 3 else None)
    assert run.error is None and run.attempts == 2
    assert [h["format"] for h in seen] == [3, 2]


def test_a_target_without_xxhash_gets_crc32(domain, tmp_path, monkeypatch):
    volume_with_text(domain)
    run, seen = replicate_to_replica(
        domain, tmp_path, monkeypatch,
        refusal=lambda header: None if header["check"] == "crc32" else
        "the stream is checked with 'xxh3', which this snapvol cannot compute (install python3-xxhash)")
    assert run.error is None and [h["check"] for h in seen] == ["xxh3", "crc32"]
