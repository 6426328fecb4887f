"""snapvol's stream format: a header of our own around the native send stream, in frames,
with an integrity check at the end. Pure (no I/O of its own beyond the file objects given);
used by the plugin and by the CLI.

Layout::

    b"SNAPVOL-STREAM\\n"                    magic
    b"H" <u32 length> <JSON header>          format version, backend, volume, snapshot, ...
    b"D" <u32 length> <bytes>                native stream (btrfs send / zfs send), repeated
    b"Z" <u32 40> <sha256 32> <u64 bytes>     end: digest of header + data, data byte count
    b"X" <u32 length> <UTF-8 message>        instead of "Z": the sender failed mid-way

A reader knows a truncated, corrupted or aborted stream from a whole one, and can hold the
last data frame back until the digest is verified (so a native receiver never completes on
data that is then found bad).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

MAGIC = b"SNAPVOL-STREAM\n"
FORMAT = 1
FRAME = 1024 * 1024          # large frames: fewer chunks and calls in every hop
MAX_HEADER = 64 * 1024
_HEAD = struct.Struct(">cI")


class StreamError(ValueError):
    """Not a snapvol stream, or one that is truncated, corrupted or aborted by its sender."""


def _frame(kind: bytes, payload: bytes) -> bytes:
    return _HEAD.pack(kind, len(payload)) + payload


def encode(header: dict[str, Any], chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The framed stream of *header* and the native stream *chunks*.

    If *chunks* raises, an abort frame carrying the error ends the stream, then the error
    propagates (the receiver sees why instead of a bare truncation).
    """
    digest = hashlib.sha256()
    head = json.dumps({"format": FORMAT, **header}, sort_keys=True).encode()
    digest.update(head)
    yield MAGIC + _frame(b"H", head)
    total = 0
    try:
        for chunk in chunks:
            for start in range(0, len(chunk), FRAME):
                piece = chunk[start:start + FRAME] if len(chunk) > FRAME else chunk
                digest.update(piece)
                total += len(piece)
                yield _HEAD.pack(b"D", len(piece))   # header and data apart: no 1 MiB copy
                yield piece
    except Exception as exc:
        yield _frame(b"X", str(exc).encode()[:4000])
        raise
    yield _frame(b"Z", digest.digest() + struct.pack(">Q", total))


class Reader:
    """Reads a framed stream from *source*: :meth:`header`, then :meth:`data` (verified)."""

    def __init__(self, source: BinaryIO) -> None:
        self._source = source
        self._digest = hashlib.sha256()
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
        data = b"".join(parts)
        self.wire_bytes += len(data)
        return data

    def _next(self) -> tuple[bytes, bytes]:
        first = self._source.read(1)
        if not first:
            raise StreamError("the stream is truncated (it ends before its end mark)")
        self.wire_bytes += 1
        kind, length = _HEAD.unpack(first + self._exact(_HEAD.size - 1, "frame header"))
        if kind not in (b"H", b"D", b"Z", b"X"):
            raise StreamError(f"the stream is corrupted (unknown frame {kind!r})")
        if length > (MAX_HEADER if kind in (b"H", b"X") else FRAME if kind == b"D" else 40):
            raise StreamError("the stream is corrupted (frame too long)")
        return kind, self._exact(length, "frame")

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
        kind, payload = self._next()
        try:
            header = json.loads(payload) if kind == b"H" else None
        except ValueError:
            header = None
        if not isinstance(header, dict):
            raise StreamError("the stream is corrupted (bad header)")
        if header.get("format") != FORMAT:
            raise StreamError(f"stream format {header.get('format')!r} is not supported "
                              f"(this snapvol reads format {FORMAT})")
        self._digest.update(payload)
        self._header = header
        return header

    def data(self, *, hold_last: bool = True) -> Iterator[bytes]:
        """The native stream, chunk by chunk. With *hold_last*, the last chunk is only given
        out after the end mark and digest have been checked.

        :raises StreamError: truncated, corrupted (digest or byte count), or aborted.
        """
        if self._header is None:
            self.header()
        held: bytes | None = None
        while True:
            kind, payload = self._next()
            if kind == b"D":
                self._digest.update(payload)
                self.bytes += len(payload)
                if held is not None:
                    yield held
                held = payload if hold_last else None
                if not hold_last:
                    yield payload
            elif kind == b"X":
                raise StreamError("the sender failed: " + payload.decode("utf-8", "replace"))
            elif kind == b"Z":
                if len(payload) != 40 or payload[:32] != self._digest.digest() \
                        or struct.unpack(">Q", payload[32:])[0] != self.bytes:
                    raise StreamError("the stream is corrupted (integrity check failed)")
                if held is not None:
                    yield held
                return
            else:
                raise StreamError("the stream is corrupted (a second header)")


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
