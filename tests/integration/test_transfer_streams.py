"""Transfers end to end on each backend (fake, Btrfs, ZFS): full and incremental streams in
each packing (the default: format 3 on Btrfs and ZFS, 2 on the fake; format 2 with the
default check and with crc32, zstd, format 1), and damaged streams (cut, a bit flipped, a frame
of another stream, a frame dropped or repeated, an abort, compressed and flipped) refused with
nothing left, full or incremental, read from a file and (format 3's spliced path) from a
socket; and bit flips all over a native Btrfs or ZFS stream."""

from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from plugin import stream
from plugin.domain import Domain
from plugin.history import ReplicationLog
from plugin.locks import VolumeLocks
from plugin.mounts import MountTable
from plugin.transfers import StreamRefused
from tests.conftest import need
from tests.fakes import FakeBackend
from tests.integration.receiving import receive_incremental

PACKINGS = {"default": {}, "format2": {"format": 2}, "crc32": {"format": 2, "check": "crc32"},
            "zstd": {"compression": "zstd"}, "format1": {"format": 1}}


@pytest.fixture
def domain(backend, tmp_path: Path) -> Domain:
    d = Domain.assemble(backend, MountTable(tmp_path / "mounts.json"), VolumeLocks(2),
                        replications=ReplicationLog(tmp_path / "replication.json"))
    d.volumes.open()
    return d


def sent(domain: Domain, snapshot: str, since: str | None = None, **packing) -> bytes:
    return b"".join(domain.transfers.send("src", snapshot, since, **packing))


def write(domain: Domain, name: str, data: bytes) -> None:
    path = domain.volumes.mount("src", "m1") / name
    path.write_bytes(data)
    domain.volumes.unmount("src", "m1")


def content(domain: Domain, volume: str) -> dict[str, bytes]:
    path = domain.volumes.mount(volume, "check")
    try:
        return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}
    finally:
        domain.volumes.unmount(volume, "check")


@pytest.mark.parametrize("packing", PACKINGS)
def test_full_then_incremental_in_each_packing(domain, backend, packing):
    if packing == "zstd":
        need("zstd")
    domain.volumes.create("src", {})
    write(domain, "rows.csv", b"".join(b"%09d,alpha,bravo\n" % i for i in range(200_000)))
    write(domain, "random", os.urandom(3 << 20))
    domain.volumes.snapshot(["src"], "s1")
    full = sent(domain, "s1", **PACKINGS[packing])
    native = backend.checked_streams and packing == "default"    # format 3: Btrfs, ZFS
    wanted = PACKINGS[packing].get("format", 3 if native else 2)
    assert stream.Reader(io.BytesIO(full)).header()["format"] == wanted
    domain.transfers.receive("dst", io.BytesIO(full))
    if isinstance(backend, FakeBackend):         # its received snapshots match nothing
        assert content(domain, "dst") == content(domain, "src")
        return
    write(domain, "later", b"written after s1")
    domain.volumes.snapshot(["src"], "s2")
    receive_incremental(domain, backend, "dst", sent(domain, "s2", "s1", **PACKINGS[packing]))
    assert content(domain, "dst") == content(domain, "src")
    assert [s.name for s in domain.volumes.snapshots("dst")] == ["s1", "s2"]


def flip(raw: bytes, at: int) -> bytes:
    bad = bytearray(raw)
    bad[at] ^= 0x20
    return bytes(bad)


def frame_starts(raw: bytes) -> list[int]:
    """Offsets of the data frames of a format 2 or 3 stream (format 3: no CRC in a frame's
    head, the header's CRC after the header)."""
    at = len(stream.MAGIC)
    size = struct.unpack(">I", raw[at + 1:at + 5])[0]
    native = b'"format": 3' in raw[at + 5:at + 5 + size]
    at += 5 + size + (4 if native else 0)
    found = []
    while raw[at:at + 1] == b"D":
        found.append(at)
        at += (5 if native else 9) + struct.unpack(">I", raw[at + 1:at + 5])[0]
    return found


def via_socket(domain: Domain, volume: str, raw: bytes) -> dict:
    """Receive *raw* as the stream socket does: from a socket's small buffered reader, where
    a format 3 stream's data is spliced on to the native receiver."""
    ours, theirs = socket.socketpair()

    def feed() -> None:
        try:
            theirs.sendall(raw)
            theirs.shutdown(socket.SHUT_WR)
        except OSError:          # refused early: the receiver closed its end
            pass
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        ours.settimeout(30)
        with ours.makefile("rb", buffering=512) as source:
            return domain.transfers.receive(volume, source, idle=30)
    finally:
        ours.close()
        feeder.join(10)
        theirs.close()


DAMAGES = ["cut at a frame boundary", "cut inside", "bit flipped", "frame of another stream",
           "frame dropped", "frame repeated", "aborted", "header bit flipped",
           "end mark bit flipped", "zstd, bit flipped"]


@pytest.mark.parametrize("path", ["file", "socket"])
@pytest.mark.parametrize("damage, packing", [
    (damage, packing) for damage in DAMAGES for packing in ("default", "format2")
    if not (damage.startswith("zstd") and packing != "default")])     # zstd: its own packing
def test_damaged_streams_are_refused_and_leave_nothing(domain, backend, damage, packing, path):
    if damage.startswith("zstd"):
        need("zstd")
    domain.volumes.create("src", {})
    write(domain, "random", os.urandom(4 << 20))
    domain.volumes.snapshot(["src"], "s1")
    packing_args = {"compression": "zstd"} if damage.startswith("zstd") else PACKINGS[packing]
    raw = sent(domain, "s1", **packing_args)
    starts = frame_starts(raw)
    assert len(starts) >= 3, "the test needs a stream of several frames"
    end = len(raw) - 5 - 16          # the end mark (its payload may hold a b"Z" byte too)
    assert raw[end:end + 1] == b"Z"
    if damage == "cut at a frame boundary":
        bad = raw[:starts[-1]]
    elif damage == "cut inside":
        bad = raw[:len(raw) * 2 // 3]
    elif damage == "frame of another stream":
        write(domain, "random", os.urandom(4 << 20))
        domain.volumes.snapshot(["src"], "s2")
        other = sent(domain, "s2", **packing_args)
        theirs = frame_starts(other)
        bad = raw[:starts[1]] + other[theirs[1]:theirs[2]] + raw[starts[2]:]
    elif damage == "frame dropped":
        bad = raw[:starts[1]] + raw[starts[2]:]
    elif damage == "frame repeated":
        bad = raw[:starts[2]] + raw[starts[1]:starts[2]] + raw[starts[2]:]
    elif damage == "aborted":
        bad = raw[:starts[-1]] + stream.abort_frame("btrfs send: exited with status 1")
    elif damage == "header bit flipped":
        bad = flip(raw, len(stream.MAGIC) + 5 + raw[len(stream.MAGIC) + 5:].index(b'"snapshot"') + 14)
    elif damage == "end mark bit flipped":
        bad = flip(raw, end + 5 + 3)
    else:
        bad = flip(raw, starts[1] + 1000)
    receive = (lambda b: via_socket(domain, "dst", b)) if path == "socket" else \
        (lambda b: domain.transfers.receive("dst", io.BytesIO(b)))
    kept = zfs_names(backend) if backend.kind == "zfs" else None
    with pytest.raises(StreamRefused, match="truncated|corrupted|fails its check|integrity|"
                       "sender failed|native receiver refused"):
        receive(bad)
    assert [v.name for v in domain.volumes.list()] == ["src"]
    if kept is not None:
        assert zfs_names(backend) == kept        # no inbox left either
    receive(raw)          # the whole one still goes in
    assert sorted(v.name for v in domain.volumes.list()) == ["dst", "src"]
    if damage != "frame of another stream":      # that one wrote src anew after s1
        assert content(domain, "dst") == content(domain, "src")


@pytest.mark.backends("btrfs")  # ZFS: the test below; the fake's streams check nothing
def test_bit_flips_anywhere_in_a_native_stream_are_refused(domain, backend):
    """Format 3 leaves the data's check to the native receiver (btrfs receive: a CRC32C per
    command): a flip anywhere in the native stream, from its magic to its last command, is
    refused before anything is published.

    One flip is let through, harmlessly: the stream version's lowest bit (1 -> 0), which no
    CRC covers and which btrfs receive reads as version 1; what it receives is then the
    same, as this checks."""
    assert backend.checked_streams
    domain.volumes.create("src", {})
    write(domain, "random", os.urandom(3 << 20))
    write(domain, "small", b"a few bytes")
    domain.volumes.snapshot(["src"], "s1")
    raw = sent(domain, "s1")
    starts = frame_starts(raw)
    first, last = starts[0] + 5, len(raw) - 5 - 16 - 1
    assert raw[first:first + 17] == b"btrfs-stream\0\x01\0\0\0"     # magic, version 1
    # the native stream's magic and version, its first commands (subvol, xattrs, mkfile),
    # the bulk of the data, and the last command (end)
    places = [first + i for i in (0, 5, 12, 13, 14, 16, 17, 20, 40, 100, 300, 1000)]
    places += [starts[1] + 5 + 4096, starts[-1] + 5 + 7, last - 4, last]
    volumes = ["src"]
    for at in places:
        for bit in (0x01, 0x02, 0x80):
            bad = bytearray(raw)
            bad[at] ^= bit
            if (at - first, bit) == (13, 0x01):
                via_socket(domain, "version0", bytes(bad))
                assert content(domain, "version0") == content(domain, "src")
                volumes.append("version0")
                continue
            with pytest.raises(StreamRefused, match="native receiver refused|corrupted"):
                via_socket(domain, "dst", bytes(bad))
            assert sorted(v.name for v in domain.volumes.list()) == volumes, (at - first, bit)
    via_socket(domain, "dst", raw)
    assert content(domain, "dst") == content(domain, "src")


def native_offset(raw: bytes, at: int) -> int:
    """Where byte *at* of the native stream is in the format 3 stream *raw*."""
    for start in frame_starts(raw):
        size = struct.unpack(">I", raw[start + 1:start + 5])[0]
        if at < size:
            return start + 5 + at
        at -= size
    raise IndexError(at)


ZFS_RECORD = 312      # every zfs send record's head (dmu_replay_record_t): BEGIN first, END last


def zfs_names(backend) -> set[str]:
    """Every dataset and snapshot below the backend's root, inboxes and clones included."""
    return set(subprocess.run(["zfs", "list", "-H", "-r", "-t", "all", "-o", "name", backend.root],
                              capture_output=True, text=True, check=True, timeout=60).stdout.split())


@pytest.mark.backends("zfs")
def test_bit_flips_anywhere_in_a_zfs_stream_are_refused(domain, backend):
    """Format 3 leaves the data's check to zfs receive: a fletcher4 checksum of the whole
    stream, which the END record carries and zfs receive compares before it commits (OpenZFS:
    also one per record); what a failed receive made, zfs destroys. A flip in the BEGIN
    record (magic, version, creation time, guids, name), in any record after it (their heads,
    the data), in the END record's type or checksum, and a stream cut short of its END record
    (in whole frames, which our framing cannot tell from a whole stream), are refused before
    anything is published.

    Some bytes no check covers, on zfs-fuse: the checksum is of everything *before* the END
    record, and zfs-fuse's receive checksums the BEGIN record rebuilt from its fields, so
    BEGIN's bytes 4-7 (drr_payloadlen, unused for a plain stream), END's bytes 4-7 and
    everything after END's checksum (drr_toguid, then zeros) are not checked, and not used
    either: a flip there is received as if it were not there, as this checks. (OpenZFS puts a
    checksum in every record, END's included, covering those too.)"""
    assert backend.checked_streams
    domain.volumes.create("src", {})
    write(domain, "random", os.urandom(3 << 20))
    write(domain, "small", b"a few bytes")
    domain.volumes.snapshot(["src"], "s1")
    raw = sent(domain, "s1")
    reader = stream.Reader(io.BytesIO(raw))
    header = {k: v for k, v in reader.header().items() if k != "format"}
    assert reader.format == 3
    native = b"".join(reader.data())
    size = len(native)
    assert struct.unpack("<IIQ", native[:16]) == (0, 0, 0x2F5BACBAC)   # BEGIN, magic
    assert native[56:].startswith(backend.root.encode() + b"/src@s1\0")   # its name
    end = size - ZFS_RECORD
    assert struct.unpack("<I", native[end:end + 4]) == (5,)                # END
    name = 56 + len(backend.root) + len("/src@")
    refused = [0, 8, 12, 16, 17, 24, 32, 36, 40, 48, name, name + 1, 200, 311,   # BEGIN
               ZFS_RECORD, ZFS_RECORD + 8, ZFS_RECORD + 100,                   # the next record
               size // 3, size // 2, end - 1,                                  # data, last record
               end, end + 8, end + 15, end + 24, end + 39]                     # END: type, checksum
    volumes, kept = ["src"], zfs_names(backend)
    for at in refused:
        for bit in (0x01, 0x80):
            bad = bytearray(raw)
            bad[native_offset(raw, at)] ^= bit
            with pytest.raises(StreamRefused, match="native receiver refused the stream"):
                via_socket(domain, "dst", bytes(bad))
            assert sorted(v.name for v in domain.volumes.list()) == volumes, (at, bit)
            assert zfs_names(backend) == kept, (at, bit)      # no inbox, no clone left
    zfs_fuse = not os.path.exists("/dev/zfs")
    for at in (4, 7, end + 4, end + 40, end + 47, end + 48, end + 200, size - 1):
        bad = bytearray(raw)
        bad[native_offset(raw, at)] ^= 0x01
        if not zfs_fuse:           # OpenZFS: each record's own checksum covers these too
            with pytest.raises(StreamRefused, match="native receiver refused the stream"):
                via_socket(domain, "dst", bytes(bad))
            continue
        copy = f"unchecked{len(volumes)}"
        via_socket(domain, copy, bytes(bad))
        assert content(domain, copy) == content(domain, "src"), at
        assert [s.name for s in domain.volumes.snapshots(copy)] == ["s1"]
        volumes.append(copy)
        assert sorted(v.name for v in domain.volumes.list()) == sorted(volumes)
        kept = zfs_names(backend)
    # cut short in whole records, framed anew: only zfs receive can tell
    for cut in (end, ZFS_RECORD * 2, size // 2):
        framed = b"".join(stream.encode(header, [native[:cut]], format=3))
        with pytest.raises(StreamRefused, match="native receiver refused the stream"):
            via_socket(domain, "dst", framed)
        assert sorted(v.name for v in domain.volumes.list()) == sorted(volumes), cut
        assert zfs_names(backend) == kept, cut
    with pytest.raises(StreamRefused, match="truncated"):      # and cut anywhere: ours
        via_socket(domain, "dst", raw[:len(raw) // 2])
    assert zfs_names(backend) == kept
    via_socket(domain, "dst", raw)
    assert content(domain, "dst") == content(domain, "src")


INCREMENTAL_DAMAGES = ["bit flipped", "end mark bit flipped", "cut inside", "native end cut"]


@pytest.mark.backends("btrfs", "zfs")   # the fake's received snapshots match nothing
@pytest.mark.parametrize("damage", INCREMENTAL_DAMAGES)
def test_a_refused_incremental_stream_leaves_the_replica_as_it_was(domain, backend, damage):
    """The replica keeps its content and snapshots. The hard case is format 3's end mark
    flipped: the native stream is whole, so the native receiver may have applied it (ZFS
    receives an incremental stream into the volume's own dataset) before the end mark is
    read; the volume must go back to the base."""
    domain.volumes.create("src", {})
    write(domain, "random", os.urandom(2 << 20))
    domain.volumes.snapshot(["src"], "s1")
    domain.transfers.receive("dst", io.BytesIO(sent(domain, "s1")))
    before = content(domain, "dst")
    write(domain, "later", os.urandom(1 << 20))
    domain.volumes.snapshot(["src"], "s2")
    raw = sent(domain, "s2", "s1")
    assert stream.Reader(io.BytesIO(raw)).header()["format"] == 3
    end = len(raw) - 5 - 16
    assert raw[end:end + 1] == b"Z"
    if damage == "bit flipped":
        bad = flip(raw, native_offset(raw, 4096))
    elif damage == "end mark bit flipped":
        bad = flip(raw, end + 5 + 3)
    elif damage == "cut inside":
        bad = raw[:len(raw) * 2 // 3]
    else:
        reader = stream.Reader(io.BytesIO(raw))
        head = {k: v for k, v in reader.header().items() if k != "format"}
        native = b"".join(reader.data())
        bad = b"".join(stream.encode(head, [native[:len(native) * 3 // 4]], format=3))
    kept = zfs_names(backend) if backend.kind == "zfs" else None
    with pytest.raises(StreamRefused, match="truncated|corrupted|integrity|native receiver refused"):
        via_socket(domain, "dst", bad)
    assert [s.name for s in domain.volumes.snapshots("dst")] == ["s1"]
    assert content(domain, "dst") == before
    if kept is not None:
        assert zfs_names(backend) == kept           # no clone, no snapshot left
    receive_incremental(domain, backend, "dst", raw)      # the whole one still goes in
    assert content(domain, "dst") == content(domain, "src")
