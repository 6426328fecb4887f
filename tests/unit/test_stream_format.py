"""Stream format 2 (per-frame running CRC): damage is found, and found at the frame it is in;
format 3 (Btrfs: no check of ours over the data) finds all damage outside the native data;
format 1 streams (snapvol 0.2) are still read, and written on request."""

from __future__ import annotations

import io
import os
import struct

import pytest

from plugin import stream

HEADER = {"backend": "btrfs", "volume": "db", "snapshot": "s2", "base": None}
DATA = os.urandom(3 * stream.FRAME + 12345)        # four data frames


@pytest.fixture(autouse=True, params=stream.CHECKS)
def check(request, monkeypatch) -> str:
    """Every test once per check this machine computes (crc32; xxh3 with python3-xxhash)."""
    monkeypatch.setattr(stream, "CHECK", request.param)
    return request.param


def encoded(data: bytes = DATA, fmt: int = stream.FORMAT, header: dict | None = None) -> bytes:
    return b"".join(stream.encode(header or HEADER, [data], format=fmt))


def frames(raw: bytes) -> tuple[bytes, list[bytes], bytes]:
    """(magic + header frame, [data frames with their headers], end frame) of a format 2 stream."""
    at = len(stream.MAGIC)
    _, length = struct.unpack(">cI", raw[at:at + 5])
    head_end = at + 5 + length
    pos, found = head_end, []
    while raw[pos:pos + 1] == b"D":
        _, length = struct.unpack(">cI", raw[pos:pos + 5])
        found.append(raw[pos:pos + 9 + length])
        pos += 9 + length
    return raw[:head_end], found, raw[pos:]


def read(raw: bytes, got: list[bytes] | None = None) -> bytes:
    reader = stream.Reader(io.BytesIO(raw))
    reader.header()
    out = got if got is not None else []
    for chunk in reader.data():
        out.append(chunk)
    return b"".join(out)


def test_format_2_round_trip_and_its_size():
    raw = encoded()
    assert read(raw) == DATA
    head, data_frames, end = frames(raw)
    assert len(data_frames) == 4 and end[:1] == b"Z"
    assert len(raw) == len(head) + len(DATA) + 4 * 9 + 5 + 16


@pytest.mark.parametrize("cut", [1, 30, 80, stream.FRAME, 2 * stream.FRAME + 7, -17, -1])
def test_truncation_anywhere_is_refused(cut):
    raw = encoded()
    with pytest.raises(stream.StreamError, match="truncated|empty|not a snapvol"):
        read(raw[:cut])


def test_a_stream_cut_at_a_frame_boundary_is_refused():
    head, data_frames, _ = frames(encoded())
    with pytest.raises(stream.StreamError, match="truncated"):
        read(head + b"".join(data_frames[:2]))


@pytest.mark.parametrize("frame, offset", [(0, 9), (1, 5), (1, 5000), (2, 9 + stream.FRAME - 1), (3, 100)])
def test_a_flipped_bit_is_caught_in_its_frame_before_it_is_handed_on(frame, offset):
    head, data_frames, end = frames(encoded())
    bad = bytearray(data_frames[frame])
    bad[offset] ^= 0x04                     # offsets 5-8: the CRC itself; 9 on: the payload
    raw = head + b"".join(data_frames[:frame]) + bytes(bad) + b"".join(data_frames[frame + 1:]) + end
    got: list[bytes] = []
    with pytest.raises(stream.StreamError, match=f"frame {frame + 1} fails its check"):
        read(raw, got)
    # nothing of the damaged frame (nor after it) reached the receiver; with the last one
    # held back, one frame less than that
    assert sum(map(len, got)) == max(0, frame - 1) * stream.FRAME


def test_a_flipped_bit_in_the_header_or_the_end_is_found():
    raw = bytearray(encoded())
    raw[len(stream.MAGIC) + 12] ^= 0x01          # inside the JSON header
    with pytest.raises(stream.StreamError, match="corrupted"):
        read(bytes(raw))
    raw = bytearray(encoded())
    raw[-3] ^= 0x80                              # the end's CRC
    with pytest.raises(stream.StreamError, match="integrity check failed"):
        read(bytes(raw))


def test_frames_dropped_repeated_or_swapped_are_found():
    head, f, end = frames(encoded())
    changed = {"dropped": f[:1] + f[2:], "repeated": f[:2] + f[1:], "swapped": [f[0], f[2], f[1], f[3]]}
    for middle in changed.values():
        with pytest.raises(stream.StreamError, match="fails its check|integrity"):
            read(head + b"".join(middle) + end)


def test_a_frame_from_another_stream_is_found():
    """Same volume, same snapshot name, same sizes: only the content differs (a foreign stream
    spliced in, e.g. two sends written to one file)."""
    head, ours, end = frames(encoded())
    _, theirs, _ = frames(encoded(os.urandom(len(DATA))))
    with pytest.raises(stream.StreamError, match="frame 2 fails its check"):
        read(head + ours[0] + theirs[1] + b"".join(ours[2:]) + end)
    # the other stream's own frames, after our header: the running CRC starts from the header
    other_head, _, _ = frames(encoded(header={**HEADER, "volume": "other"}))
    with pytest.raises(stream.StreamError, match="frame 1 fails its check"):
        read(other_head + b"".join(ours) + end)


def test_format_1_is_still_read_and_written_on_request():
    raw = encoded(fmt=1)
    reader = stream.Reader(io.BytesIO(raw))
    assert reader.header()["format"] == 1
    assert b"".join(reader.data()) == DATA
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x10
    with pytest.raises(stream.StreamError, match="integrity check failed"):
        read(bytes(flipped))
    with pytest.raises(stream.StreamError, match="truncated"):
        read(raw[:-10])


def test_the_header_names_the_check_and_an_unknown_one_is_refused(check):
    raw = encoded()
    assert stream.Reader(io.BytesIO(raw)).header()["check"] == check
    with pytest.raises(stream.StreamError, match="checked with 'sha3', which this snapvol cannot compute"):
        read(_with_check(raw, "sha3"))


def _with_check(raw: bytes, name: str) -> bytes:
    """*raw* with its header's check renamed (the frames left as they are)."""
    head, data_frames, end = frames(raw)
    text = head[len(stream.MAGIC) + 5:].replace(b'"check": "' + stream.CHECK.encode(), b'"check": "' + name.encode())
    return stream.MAGIC + struct.pack(">cI", b"H", len(text)) + text + b"".join(data_frames) + end


def test_an_unknown_format_names_the_ones_read():
    with pytest.raises(stream.StreamError, match=r"stream format 4 is not supported \(this snapvol reads formats 1, 2, 3\)"):
        read(encoded(header={**HEADER, "format": 4}))



def native_frames(raw: bytes) -> tuple[bytes, list[bytes], bytes]:
    """(beginning: magic, header frame and its CRC; [data frames]; end frame) of format 3."""
    at = len(stream.MAGIC)
    head_end = at + 5 + struct.unpack(">I", raw[at + 1:at + 5])[0] + 4
    pos, found = head_end, []
    while raw[pos:pos + 1] == b"D":
        length = struct.unpack(">I", raw[pos + 1:pos + 5])[0]
        found.append(raw[pos:pos + 5 + length])
        pos += 5 + length
    return raw[:head_end], found, raw[pos:]


def relayed(raw: bytes) -> bytes:
    """What Reader.relay moves on (the payloads, unread by it), after checking the rest."""
    source = io.BytesIO(raw)
    moved: list[bytes] = []
    reader = stream.Reader(source)
    reader.relay(lambda length: moved.append(source.read(length)))
    return b"".join(moved)


def test_format_3_round_trip_by_data_and_by_relay():
    raw = encoded(fmt=stream.NATIVE)
    head, data_frames, end = native_frames(raw)
    assert len(data_frames) == 4 and len(end) == 5 + 16
    assert len(raw) == len(DATA) + len(head) + 4 * 5 + len(end)      # no check in a frame
    reader = stream.Reader(io.BytesIO(raw))
    assert reader.header()["check"] == "native"
    assert read(raw) == DATA and relayed(raw) == DATA


@pytest.mark.parametrize("damage", ["header", "header check", "end bytes", "end frames",
                                    "end check", "cut", "frame dropped", "frame repeated"])
def test_format_3_damage_outside_the_native_data_is_found_by_data_and_by_relay(damage):
    """The native receiver checks the data; everything else is ours to check."""
    raw = encoded(fmt=stream.NATIVE)
    head, data_frames, end = native_frames(raw)
    flip = {"header": len(stream.MAGIC) + 20, "header check": len(head) - 2,
            "end bytes": len(raw) - 10, "end frames": len(raw) - 6, "end check": len(raw) - 1}
    if damage in flip:
        bad = bytearray(raw)
        bad[flip[damage]] ^= 0x04
        bad = bytes(bad)
    elif damage == "cut":
        bad = head + b"".join(data_frames)
    elif damage == "frame dropped":
        bad = head + b"".join(data_frames[:1] + data_frames[2:]) + end
    else:
        bad = head + b"".join(data_frames[:2] + data_frames[1:]) + end
    for how in (read, relayed):
        with pytest.raises(stream.StreamError, match="corrupted|truncated"):
            how(bad)


def test_format_3_a_sender_failure_is_reported():
    head, data_frames, _ = native_frames(encoded(fmt=stream.NATIVE))
    bad = head + data_frames[0] + stream.abort_frame("btrfs send: No space left")
    for how in (read, relayed):
        with pytest.raises(stream.StreamError, match="the sender failed: btrfs send: No space left"):
            how(bad)
