"""Transfer.into: a format 3 stream's data goes from the native sender's pipe into the socket
by splice(2), framed so that the Reader takes it whole; a sender that fails ends the stream
with its abort frame, and a client that goes away stops the sender. Tiny real programs stand
in for ``btrfs send``."""

from __future__ import annotations

import io
import os
import socket
import sys
import threading
from pathlib import Path

import pytest

from plugin import stream
from plugin.transfers import Transfer

HEADER = {"backend": "btrfs", "volume": "db", "snapshot": "s1"}


def drain(sock: socket.socket, out: list[bytes]) -> None:
    try:
        while piece := sock.recv(1 << 16):
            out.append(piece)
    except OSError:
        pass


def run(transfer: Transfer, *, timeout: float | None = 5.0) -> tuple[bytes, BaseException | None]:
    """Everything *transfer* gives a socket (what it yields sent first, as gunicorn does)."""
    ours, theirs = socket.socketpair()
    ours.settimeout(timeout)
    got: list[bytes] = []
    reader = threading.Thread(target=drain, args=(theirs, got))
    reader.start()
    error = None
    try:
        for chunk in transfer.into(ours, timeout=timeout):
            ours.sendall(chunk)
    except Exception as exc:        # noqa: BLE001 (the test looks at it)
        error = exc
    ours.shutdown(socket.SHUT_WR)
    reader.join(10)
    ours.close()
    theirs.close()
    return b"".join(got), error


def transfer(argv: list[str], done: list[bool], **kwargs) -> Transfer:
    return Transfer(dict(HEADER), argv, done.append, format=stream.NATIVE, **kwargs)


def test_the_native_stream_arrives_whole_in_frames(tmp_path: Path):
    data = os.urandom(5 * stream.FRAME + 12345)
    (tmp_path / "native").write_bytes(data)
    done: list[bool] = []
    t = transfer(["cat", str(tmp_path / "native")], done)
    raw, error = run(t)
    assert error is None and done == [True] and t.bytes == len(data)
    reader = stream.Reader(io.BytesIO(raw))
    assert reader.header()["format"] == stream.NATIVE
    assert b"".join(reader.data()) == data
    # the same stream as iterating the transfer makes, but for where the frames end
    again = b"".join(transfer(["cat", str(tmp_path / "native")], []))
    assert b"".join(stream.Reader(io.BytesIO(again)).data()) == data


def test_a_sender_that_fails_midway_ends_the_stream_with_its_abort_frame():
    done: list[bool] = []
    argv = [sys.executable, "-c", "import os, sys; os.write(1, b'x' * 3000000); "
            "sys.stderr.write('cannot read the snapshot'); sys.exit(3)"]
    raw, error = run(transfer(argv, done))
    assert error is not None and "cannot read the snapshot" in str(error)
    assert done == [False]
    with pytest.raises(stream.StreamError, match="the sender failed: .*cannot read the snapshot"):
        b"".join(stream.Reader(io.BytesIO(raw)).data())


def test_a_client_that_goes_away_stops_the_sender():
    done: list[bool] = []
    t = transfer(["cat", "/dev/zero"], done)
    ours, theirs = socket.socketpair()
    items = t.into(ours, timeout=5.0)
    ours.sendall(next(items))                       # the stream's beginning, then:
    theirs.close()                                  # the client goes away
    with pytest.raises(OSError):
        next(items)
    ours.close()
    assert done == [False]
    assert t._child.proc.poll() is not None         # noqa: SLF001 (no sender left running)


def test_a_compressed_or_older_format_is_all_yielded(tmp_path: Path):
    data = os.urandom(stream.FRAME + 5)
    (tmp_path / "native").write_bytes(data)
    t = Transfer(dict(HEADER), ["cat", str(tmp_path / "native")], lambda complete: None, format=2)
    raw, error = run(t)
    assert error is None
    reader = stream.Reader(io.BytesIO(raw))
    assert reader.header()["format"] == 2 and b"".join(reader.data()) == data
