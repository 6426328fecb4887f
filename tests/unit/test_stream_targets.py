"""The stream format (header, frames, integrity check) and replication target parsing."""

from __future__ import annotations

import io

import pytest

from plugin import stream
from plugin.targets import Target

HEADER = {"backend": "btrfs", "volume": "db", "snapshot": "s2", "base": "s1"}


def encoded(data: bytes = b"x" * 2_700_000, header: dict | None = None) -> bytes:
    return b"".join(stream.encode(header or HEADER, [data[:100], data[100:]]))


def read_all(raw: bytes, hold_last: bool = True) -> tuple[dict, bytes]:
    reader = stream.Reader(io.BytesIO(raw))
    header = reader.header()
    return header, b"".join(reader.data(hold_last=hold_last))


def test_round_trip_keeps_header_and_data():
    data = bytes(range(256)) * 5000
    header, out = read_all(encoded(data))
    assert out == data
    assert header == {"format": stream.FORMAT, "check": stream.CHECK, **HEADER}


@pytest.mark.parametrize("cut", [0, 5, 20, 100, 300_000, 1_200_000, -41, -1])
def test_truncated_streams_are_refused(cut):
    raw = encoded()[:cut]
    with pytest.raises(stream.StreamError, match="empty|truncated|not a snapvol"):
        read_all(raw)


@pytest.mark.parametrize("where", [40, 1000, 400_000, 2_000_000, -20])
def test_a_flipped_bit_is_found(where):
    raw = bytearray(encoded())
    raw[where] ^= 0x10
    with pytest.raises(stream.StreamError, match="corrupted|truncated|frame"):
        read_all(bytes(raw))


def test_the_last_chunk_is_held_until_the_check_passed():
    raw = bytearray(encoded(b"y" * 2_600_000))
    raw[-10] ^= 1                                   # the digest
    reader = stream.Reader(io.BytesIO(bytes(raw)))
    reader.header()
    got = []
    with pytest.raises(stream.StreamError, match="integrity"):
        for chunk in reader.data():
            got.append(chunk)
    assert sum(map(len, got)) < 2_600_000            # the end never reached the receiver


def test_a_sender_failure_is_carried_in_the_stream():
    def failing():
        yield b"a" * 10
        raise RuntimeError("btrfs send failed: disk error")
    chunks = []
    with pytest.raises(RuntimeError):
        for piece in stream.encode(HEADER, failing()):
            chunks.append(piece)
    with pytest.raises(stream.StreamError, match="the sender failed: btrfs send failed: disk error"):
        read_all(b"".join(chunks))


def test_other_formats_are_refused():
    with pytest.raises(stream.StreamError, match="not a snapvol stream"):
        read_all(b"BTRFS\x00stream..........")
    with pytest.raises(stream.StreamError, match="format 99 is not supported"):
        read_all(encoded(header={**HEADER, "format": 99}))


@pytest.mark.parametrize("text, parsed", [
    ("ssh://backup@standby", Target("ssh", "standby", "backup")),
    ("ssh://standby.example.com:2222/run/docker/plugins/snapvol.sock",
     Target("ssh", "standby.example.com", None, 2222, "/run/docker/plugins/snapvol.sock")),
    ("ssh://root@[::1]:22", Target("ssh", "[::1]", "root", 22)),
    ("unix:///run/docker/plugins/replica.sock", Target("unix", socket="/run/docker/plugins/replica.sock")),
    ("/run/docker/plugins/replica.sock", Target("unix", socket="/run/docker/plugins/replica.sock")),
])
def test_targets_parse(text, parsed):
    assert Target.parse(text) == parsed
    assert Target.parse(str(parsed)) == parsed


@pytest.mark.parametrize("text", [
    "ssh://-oProxyCommand=touch%20x", "ssh://host;reboot", "ssh://$(id)@host", "ssh://host:0",
    "ssh://host:99999", "ssh://host/run/../etc/passwd", "ssh://host/a b", "ftp://host", "",
    "relative.sock", "unix://run/x.sock", "/run/x.sock;rm", None, 7, "ssh://" + "h" * 600,
    "ssh://-host",
])
def test_hostile_targets_are_refused(text):
    with pytest.raises(ValueError, match="target|host|user|port|path"):
        Target.parse(text)
