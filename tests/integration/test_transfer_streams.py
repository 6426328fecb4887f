"""Transfers end to end on each backend (fake, Btrfs, ZFS): full and incremental streams in
each packing (format 2 with the default check, format 2 with crc32, zstd, format 1), and
damaged streams (cut, a bit flipped, a frame of another stream, compressed and flipped)
refused with nothing left."""

from __future__ import annotations

import io
import os
import shutil
import struct
from pathlib import Path

import pytest

from plugin import stream
from plugin.domain import Domain
from plugin.history import ReplicationLog
from plugin.locks import VolumeLocks
from plugin.mounts import MountTable
from plugin.transfers import StreamRefused
from tests.fakes import FakeBackend

PACKINGS = {"default": {}, "crc32": {"check": "crc32"}, "zstd": {"compression": "zstd"},
            "format1": {"format": 1}}


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
    if packing == "zstd" and shutil.which("zstd") is None:
        pytest.skip("needs zstd")
    domain.volumes.create("src", {})
    write(domain, "rows.csv", b"".join(b"%09d,alpha,bravo\n" % i for i in range(200_000)))
    write(domain, "random", os.urandom(3 << 20))
    domain.volumes.snapshot(["src"], "s1")
    full = sent(domain, "s1", **PACKINGS[packing])
    assert stream.Reader(io.BytesIO(full)).header()["format"] == PACKINGS[packing].get("format", 2)
    domain.transfers.receive("dst", io.BytesIO(full))
    if isinstance(backend, FakeBackend):         # its received snapshots match nothing
        assert content(domain, "dst") == content(domain, "src")
        return
    write(domain, "later", b"written after s1")
    domain.volumes.snapshot(["src"], "s2")
    domain.transfers.receive("dst", io.BytesIO(sent(domain, "s2", "s1", **PACKINGS[packing])))
    assert content(domain, "dst") == content(domain, "src")
    assert [s.name for s in domain.volumes.snapshots("dst")] == ["s1", "s2"]


def flip(raw: bytes, at: int) -> bytes:
    bad = bytearray(raw)
    bad[at] ^= 0x20
    return bytes(bad)


def frame_starts(raw: bytes) -> list[int]:
    """Offsets of the data frames of a format 2 stream."""
    at = len(stream.MAGIC)
    at += 5 + struct.unpack(">I", raw[at + 1:at + 5])[0]
    found = []
    while raw[at:at + 1] == b"D":
        found.append(at)
        at += 9 + struct.unpack(">I", raw[at + 1:at + 5])[0]
    return found


@pytest.mark.parametrize("damage", ["cut at a frame boundary", "cut inside", "bit flipped",
                                    "frame of another stream", "zstd, bit flipped"])
def test_damaged_streams_are_refused_and_leave_nothing(domain, damage):
    if damage.startswith("zstd") and shutil.which("zstd") is None:
        pytest.skip("needs zstd")
    domain.volumes.create("src", {})
    write(domain, "random", os.urandom(4 << 20))
    domain.volumes.snapshot(["src"], "s1")
    packing = {"compression": "zstd"} if damage.startswith("zstd") else {}
    raw = sent(domain, "s1", **packing)
    starts = frame_starts(raw)
    assert len(starts) >= 3, "the test needs a stream of several frames"
    if damage == "cut at a frame boundary":
        bad = raw[:starts[-1]]
    elif damage == "cut inside":
        bad = raw[:len(raw) * 2 // 3]
    elif damage == "frame of another stream":
        write(domain, "random", os.urandom(4 << 20))
        domain.volumes.snapshot(["src"], "s2")
        other = sent(domain, "s2")
        theirs = frame_starts(other)
        bad = raw[:starts[1]] + other[theirs[1]:theirs[2]] + raw[starts[2]:]
    else:
        bad = flip(raw, starts[1] + 1000)
    with pytest.raises(StreamRefused, match="truncated|corrupted|fails its check|integrity"):
        domain.transfers.receive("dst", io.BytesIO(bad))
    assert [v.name for v in domain.volumes.list()] == ["src"]
    domain.transfers.receive("dst", io.BytesIO(raw))          # the whole one still goes in
    assert sorted(v.name for v in domain.volumes.list()) == ["dst", "src"]
