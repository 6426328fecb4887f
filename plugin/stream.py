"""snapvol's stream format: a header of our own around the native send stream, in frames,
with an integrity check. Pure (no I/O of its own beyond the file objects given); used by the
plugin and by the CLI.

Format 2 (written by default since 0.3)::

    b"SNAPVOL-STREAM\\n"                    magic
    b"H" <u32 length> <JSON header>          {"format": 2, backend, volume, snapshot, ...}
    b"D" <u32 length> <u32 check> <bytes>    native stream (btrfs send / zfs send), repeated;
                                             check: the header's "check" (CRC-32, or the low
                                             32 bits of XXH3-64) running over the header and
                                             all data so far, this frame's included
    b"Z" <u32 16> <u64 bytes> <u32 frames> <u32 check>  end: data byte count, frame
                                             count, the running check once more
    b"X" <u32 length> <UTF-8 message>        instead of "Z": the sender failed mid-way

Format 3 (written by default for uncompressed streams, Btrfs and ZFS): the native stream
checks itself, so no check of ours runs over it::

    b"SNAPVOL-STREAM\n"                    magic
    b"H" <u32 length> <JSON header> <u32 CRC-32 of the JSON header>      {"format": 3, ...}
    b"D" <u32 length> <bytes>                native stream, repeated, no check of ours
    b"Z" <u32 16> <u64 bytes> <u32 frames> <u32 CRC-32 of the JSON header>   end
    b"X" <u32 length> <UTF-8 message>        instead of "Z": the sender failed mid-way

Written only for a stream whose native receiver verifies it before anything it received is
published (``Backend.checked_streams``), and the receiving backend publishes nothing unless
the end mark checked out too:

* ``btrfs send`` puts a CRC32C in every command (header and data); ``btrfs receive``, into
  staging, refuses a command that fails it, and a stream without its magic.
* ``zfs send`` ends its stream with a fletcher4 checksum of all of it. zfs-fuse's ``zfs
  receive`` checks it only at that END record, having applied the records before it; when
  it fails it undoes them (destroys the ``recv:`` inbox it made for a full stream, or the
  clone or rolls back the volume for an incremental one). OpenZFS also checksums each record
  as it goes. Unchecked on zfs-fuse, and unused: bytes 4-7 of the BEGIN and END records and
  what follows END's checksum (it checksums BEGIN rebuilt from its fields, the stream
  before END).

What the native check cannot see is ours to find: truncation and frames lost or repeated (the
byte and frame counts in ``Z``), an abort (``X``), a damaged header (its own CRC-32, checked
before the header is used), another kind of stream (the magic, the header's backend). The
data is relayed unheld, so the native receiver may have taken a whole native stream when a
bad end mark is read: the backend undoes it then (the staging emptied; the inbox destroyed,
or the volume rolled back to the base), and discards what a refused receive left, resumable
state included. Without a check over the data, both plugins move it with splice(2): it never
passes through Python, which was most of the CPU a transfer added to the native pipe.

Format 1 (0.2): the same as 2 without the per-frame CRC, and ``Z`` carries a SHA-256 of header
and data (32 bytes) and the byte count (8). All three are read; formats 1 and 2 are written on
request, for a receiver that reads only those (:func:`encode`'s *format*).

The header names the check: ``"xxh3"`` where python3-xxhash is installed (the plugin's image
and ``scripts/lib.sh`` install it; 14.7 GB/s of CPU here, 5x cheaper than zlib's CRC-32),
else ``"crc32"`` (zlib, always there); a reader without xxhash refuses an xxh3 stream by name.

Why a CRC and not SHA-256: the check is there for accidents (a stream file that rotted, a cut
connection, a frame lost or repeated), not for an attacker, who could recompute any unkeyed
digest; the transport that needs an authenticator has one (ssh). CRC-32 finds every burst of
up to 32 flipped bits and any other random damage but for one case in 2**32, and costs a third
of SHA-256's CPU here even with the CPU's SHA extensions (profiled: hashing was about half of
the CPU a transfer added to the native pipe, on a machine where that pipe already keeps both
cores busy). Running over the whole stream, each frame's CRC also finds frames dropped,
repeated, reordered or taken from another stream, and a receiver checks each frame *before*
handing it on, so damage is caught where it is, not only at the end.

A reader knows a truncated, corrupted or aborted stream from a whole one, and can hold the
last data frame back until the end mark is verified (so a native receiver never completes on
a stream that is then found cut short; formats 1 and 2, whose data Python reads anyway).

The header may say ``"compression": "zstd"``: the data frames then carry the native stream
compressed by zstd (the CRC covers what travels, i.e. the compressed bytes).
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

try:                        # Debian's python3-xxhash: 5x cheaper than CRC-32 (optional)
    import xxhash
except ImportError:         # pragma: no cover (depends on the machine)
    xxhash = None

MAGIC = b"SNAPVOL-STREAM\n"
FORMAT = 2                   # what encode() writes by default
NATIVE = 3                   # the format without our own check, for self-checking native streams
FORMATS = (1, 2, 3)          # what Reader reads
FRAME = 1024 * 1024          # large frames: fewer chunks and calls in every hop
MAX_HEADER = 64 * 1024
_HEAD = struct.Struct(">cI")
_CRC = struct.Struct(">I")
_END2 = struct.Struct(">QII")      # format 2 end: bytes, frames, running CRC


CHECKS = ("crc32", "xxh3") if xxhash is not None else ("crc32",)   # what this machine computes
CHECK = CHECKS[-1]          # what encode() uses by default: the cheapest here


class StreamError(ValueError):
    """Not a snapvol stream, or one that is truncated, corrupted or aborted by its sender."""


class _Running:
    """Format 2's running check over the header and all data so far, as a u32."""

    def __init__(self, name: str, head: bytes) -> None:
        self._hash = xxhash.xxh3_64(head) if name == "xxh3" else None
        self._crc = zlib.crc32(head) if self._hash is None else 0

    def update(self, data: bytes) -> int:
        if self._hash is None:
            self._crc = zlib.crc32(data, self._crc)
            return self._crc
        self._hash.update(data)
        return self._hash.intdigest() & 0xFFFFFFFF

    def value(self) -> int:
        return self._crc if self._hash is None else self._hash.intdigest() & 0xFFFFFFFF


def _frame(kind: bytes, payload: bytes) -> bytes:
    return _HEAD.pack(kind, len(payload)) + payload


def encode(header: dict[str, Any], chunks: Iterable[bytes], *, format: int = FORMAT,
           check: str | None = None) -> Iterator[bytes]:
    """The framed stream of *header* and the native stream *chunks*, in *format* (2, or 1
    for a receiver that reads only that), format 2 with *check* (default: the header's, else
    :data:`CHECK`).

    If *chunks* raises, an abort frame carrying the error ends the stream, then the error
    propagates (the receiver sees why instead of a bare truncation).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown stream format {format!r}")
    if format == 1:
        head = json.dumps({"format": format, **header}, sort_keys=True).encode()
        yield MAGIC + _frame(b"H", head)
        yield from _encode_v1(head, chunks)
        return
    if format == NATIVE:
        yield from _encode_native(header, chunks)
        return
    check = check or header.get("check") or CHECK
    if check not in CHECKS:
        raise ValueError(f"unknown or unavailable stream check {check!r}")
    head = json.dumps({"format": format, **header, "check": check}, sort_keys=True).encode()
    yield MAGIC + _frame(b"H", head)
    running = _Running(check, head)
    crc = running.value()
    total = frames = 0
    try:
        for chunk in chunks:
            for start in range(0, len(chunk), FRAME):
                piece = chunk[start:start + FRAME] if len(chunk) > FRAME else chunk
                crc = running.update(piece)
                total += len(piece)
                frames += 1
                # header and data apart: no 1 MiB copy to glue 9 bytes in front
                yield _HEAD.pack(b"D", len(piece)) + _CRC.pack(crc)
                yield piece
    except Exception as exc:
        yield abort_frame(str(exc))
        raise
    yield _frame(b"Z", _END2.pack(total, frames, crc))


def native_start(header: dict[str, Any]) -> tuple[bytes, int]:
    """Format 3's beginning (magic, header frame, the header's CRC-32), and that CRC, which
    :func:`native_end` repeats. The header's ``check`` names none: the native stream's own."""
    head = json.dumps({**header, "format": NATIVE, "check": "native"}, sort_keys=True).encode()
    check = zlib.crc32(head)
    return MAGIC + _frame(b"H", head) + _CRC.pack(check), check


def native_data_head(length: int) -> bytes:
    """The head of a format 3 data frame of *length* bytes (at most :data:`FRAME`)."""
    return _HEAD.pack(b"D", length)


def native_end(total: int, frames: int, check: int) -> bytes:
    """Format 3's end mark: *total* native bytes in *frames* frames; *check*: the header's."""
    return _frame(b"Z", _END2.pack(total, frames, check))


def abort_frame(message: str) -> bytes:
    """The frame that ends a stream whose sender failed (any format), saying why."""
    return _frame(b"X", message.encode()[:4000])


def _encode_native(header: dict[str, Any], chunks: Iterable[bytes]) -> Iterator[bytes]:
    start, check = native_start(header)
    yield start
    total = frames = 0
    try:
        for chunk in chunks:
            for offset in range(0, len(chunk), FRAME):
                piece = chunk[offset:offset + FRAME] if len(chunk) > FRAME else chunk
                total += len(piece)
                frames += 1
                yield native_data_head(len(piece))
                yield piece
    except Exception as exc:
        yield abort_frame(str(exc))
        raise
    yield native_end(total, frames, check)


def _encode_v1(head: bytes, chunks: Iterable[bytes]) -> Iterator[bytes]:
    digest = hashlib.sha256(head)
    total = 0
    try:
        for chunk in chunks:
            for start in range(0, len(chunk), FRAME):
                piece = chunk[start:start + FRAME] if len(chunk) > FRAME else chunk
                digest.update(piece)
                total += len(piece)
                yield _HEAD.pack(b"D", len(piece))
                yield piece
    except Exception as exc:
        yield abort_frame(str(exc))
        raise
    yield _frame(b"Z", digest.digest() + struct.pack(">Q", total))


class Reader:
    """Reads a framed stream (format 1 or 2) from *source*: :meth:`header`, then
    :meth:`data` (verified)."""

    def __init__(self, source: BinaryIO) -> None:
        self._source = source
        self._digest: Any = None      # format 1: SHA-256 of header and data
        self._running: _Running | None = None   # format 2: the running check
        self._crc = 0                 # ... and its value so far
        self._frames = 0
        self._head_check = 0          # format 3: the header's CRC-32
        self.format: int | None = None
        self.bytes = 0                # native bytes read so far
        self.wire_bytes = 0           # everything read, framing included
        self._header: dict[str, Any] | None = None

    def _exact(self, size: int, what: str) -> bytes:
        parts, left = [], size
        while left:
            piece = self._source.read(left)
            if not piece:
                raise StreamError(f"the stream is truncated (ends inside the {what})")
            parts.append(piece)
            left -= len(piece)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.wire_bytes += len(data)
        return data

    def _next(self) -> tuple[bytes, bytes, int]:
        """The next frame: kind, payload, and (format 2 data frames) the CRC it carries."""
        kind, length, crc = self._frame_head()
        return kind, self._exact(length, "frame"), crc

    def _frame_head(self) -> tuple[bytes, int, int]:
        """The next frame's kind, length and CRC, checked for what can be checked unread."""
        first = self._source.read(1)
        if not first:
            raise StreamError("the stream is truncated (it ends before its end mark)")
        self.wire_bytes += 1
        kind, length = _HEAD.unpack(first + self._exact(_HEAD.size - 1, "frame header"))
        if kind not in (b"H", b"D", b"Z", b"X"):
            raise StreamError(f"the stream is corrupted (unknown frame {kind!r})")
        end_size = 40 if self.format == 1 else _END2.size
        if length > (MAX_HEADER if kind in (b"H", b"X") else FRAME if kind == b"D" else end_size):
            raise StreamError("the stream is corrupted (frame too long)")
        crc = 0
        if kind == b"D" and self.format == 2:
            crc = _CRC.unpack(self._exact(_CRC.size, "frame header"))[0]
        return kind, length, crc

    def header(self) -> dict[str, Any]:
        """The header, checked for magic and format.

        :raises StreamError: empty, not a snapvol stream, or a format this version cannot read.
        """
        magic = self._source.read(len(MAGIC))
        self.wire_bytes += len(magic)
        if not magic:
            raise StreamError("the stream is empty")
        if magic != MAGIC:
            raise StreamError("not a snapvol stream (made by `snapvol send`)")
        kind, payload, _ = self._next()
        try:
            header = json.loads(payload) if kind == b"H" else None
        except ValueError:
            header = None
        if not isinstance(header, dict):
            raise StreamError("the stream is corrupted (bad header)")
        if header.get("format") not in FORMATS:
            raise StreamError(f"stream format {header.get('format')!r} is not supported "
                              f"(this snapvol reads formats {', '.join(map(str, FORMATS))})")
        self.format = header["format"]
        if self.format == 1:
            self._digest = hashlib.sha256(payload)
        elif self.format == NATIVE:
            # checked before anything uses the header: its names and options are acted on
            self._head_check = _CRC.unpack(self._exact(_CRC.size, "header"))[0]
            if self._head_check != zlib.crc32(payload):
                raise StreamError("the stream is corrupted (its header fails its check)")
        else:
            check = header.get("check", "crc32")
            if check not in CHECKS:
                raise StreamError(f"the stream is checked with {check!r}, which this snapvol "
                                  "cannot compute" + (" (install python3-xxhash)" if check == "xxh3" else ""))
            self._running = _Running(check, payload)
            self._crc = self._running.value()
        self._header = header
        return header

    def data(self, *, hold_last: bool = True) -> Iterator[bytes]:
        """The native stream (as sent: compressed if the header says so), chunk by chunk.
        Each format 2 frame is checked before it is given out; with *hold_last*, the last
        chunk is only given out after the end mark has been checked.

        :raises StreamError: truncated, corrupted (CRC, digest, byte or frame count), or aborted.
        """
        if self._header is None:
            self.header()
        held: bytes | None = None
        while True:
            kind, payload, crc = self._next()
            if kind == b"D":
                if self.format == 1:
                    self._digest.update(payload)
                elif self.format == 2:   # format 3: the native receiver checks the data
                    self._crc = self._running.update(payload)   # type: ignore[union-attr]
                    if crc != self._crc:
                        raise StreamError(f"the stream is corrupted (frame {self._frames + 1} "
                                          "fails its check)")
                self._frames += 1
                self.bytes += len(payload)
                if held is not None:
                    yield held
                held = payload if hold_last else None
                if not hold_last:
                    yield payload
            elif kind == b"X":
                raise StreamError("the sender failed: " + payload.decode("utf-8", "replace"))
            elif kind == b"Z":
                if not self._end_matches(payload):
                    raise StreamError("the stream is corrupted (integrity check failed)")
                if held is not None:
                    yield held
                return
            else:
                raise StreamError("the stream is corrupted (a second header)")

    def relay(self, move: Callable[[int], None]) -> None:
        """Check a format 2 or 3 stream's structure (frames, their sizes and count, the byte
        count, the end mark, an abort; format 3: the header's check repeated) while *move*
        carries each frame's payload on unread (given its length; the kernel can move it, see
        ``snapvol send``). Format 2's CRCs are not checked here: the receiver checks them; a
        format 3 stream has no check of ours over its data, which is all :meth:`data` would
        check too. A format 1 stream is read and checked whole instead.

        :raises StreamError: truncated, aborted, or with frames that do not add up.
        """
        if self._header is None:
            self.header()
        if self.format not in (2, NATIVE):
            for _ in self.data(hold_last=False):
                pass
            return
        while True:
            kind, length, _ = self._frame_head()
            if kind == b"D":
                move(length)
                self._frames += 1
                self.bytes += length
                self.wire_bytes += length
            elif kind == b"X":
                raise StreamError("the sender failed: "
                                  + self._exact(length, "frame").decode("utf-8", "replace"))
            elif kind == b"Z":
                end = self._exact(length, "frame")
                wanted = (self.bytes, self._frames) + ((self._head_check,) if self.format == NATIVE else ())
                if len(end) != _END2.size or _END2.unpack(end)[:len(wanted)] != wanted:
                    raise StreamError("the stream is corrupted (integrity check failed)")
                return
            else:
                raise StreamError("the stream is corrupted (a second header)")

    def _end_matches(self, payload: bytes) -> bool:
        if self.format == 1:
            return (len(payload) == 40 and payload[:32] == self._digest.digest()
                    and struct.unpack(">Q", payload[32:])[0] == self.bytes)
        check = self._head_check if self.format == NATIVE else self._crc
        return (len(payload) == _END2.size
                and _END2.unpack(payload) == (self.bytes, self._frames, check))


def prefetch(items: Iterable[bytes], depth: int = 8) -> Iterator[bytes]:
    """*items*, produced by a thread of their own up to *depth* ahead, so reading one side of
    a transfer overlaps writing the other (pipe and socket I/O and hashing release the GIL).
    An error of the producer is raised here; when the consumer stops early, the producer
    stops at its next item."""
    import queue
    import threading

    box: queue.Queue[tuple[str, object]] = queue.Queue(depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        box.put(("item", item), timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            box.put(("end", None))
        except BaseException as exc:   # handed to the consumer, raised there
            box.put(("error", exc))

    worker = threading.Thread(target=produce, name="snapvol-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = box.get()
            if kind == "item":
                yield value  # type: ignore[misc]
            elif kind == "error":
                raise value  # type: ignore[misc]
            else:
                return
    finally:
        stop.set()
        for _ in range(100):            # unblock a producer waiting on a full queue; one
            if not worker.is_alive():   # blocked on I/O ends with its I/O (a daemon thread)
                break
            try:
                box.get(timeout=0.1)
            except queue.Empty:
                pass
