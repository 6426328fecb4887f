"""client.forward: snapvol receive's input reaches the stream socket whole, moved by the
kernel from a pipe (splice) or a file (sendfile), also when the socket is full for a while."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from plugin import client

DATA = os.urandom(5 * client.SPLICE_CHUNK + 777)


def write_all(fd: int) -> None:
    try:
        os.write(fd, DATA)
    except BrokenPipeError:                  # the reader gave up (the timeout test)
        pass
    finally:
        os.close(fd)


def drain(sock: socket.socket, out: list[bytes]) -> None:
    while piece := sock.recv(1 << 16):
        out.append(piece)


def through(source, timeout: float = 5.0) -> tuple[bytes, list[int]]:
    ours, theirs = socket.socketpair()
    ours.settimeout(timeout)                 # non-blocking underneath, as send_stream's socket
    got: list[bytes] = []
    reader = threading.Thread(target=drain, args=(theirs, got))
    reader.start()
    seen: list[int] = []
    moved = client.forward(source, ours, timeout, seen.append)
    ours.shutdown(socket.SHUT_WR)
    reader.join(10)
    ours.close()
    theirs.close()
    assert moved == len(DATA)
    return b"".join(got), seen


def test_from_a_pipe():
    r, w = os.pipe()
    writer = threading.Thread(target=write_all, args=(w,))
    writer.start()
    with os.fdopen(r, "rb", buffering=0) as source:
        data, seen = through(source)
    writer.join()
    assert data == DATA and seen[-1] == len(DATA) and seen == sorted(seen)


def test_from_a_file_from_where_it_stands(tmp_path):
    path = tmp_path / "stream"
    path.write_bytes(b"skip" + DATA)
    with path.open("rb", buffering=0) as source:
        os.lseek(source.fileno(), 4, os.SEEK_SET)
        data, _ = through(source)
    assert data == DATA


def test_a_receiver_that_never_reads_times_out():
    r, w = os.pipe()
    writer = threading.Thread(target=write_all, args=(w,))
    writer.start()
    ours, theirs = socket.socketpair()
    ours.settimeout(0.5)
    with os.fdopen(r, "rb", buffering=0) as source, pytest.raises(TimeoutError, match="took no data"):
        client.forward(source, ours, 0.5)
    theirs.close()                           # lets the writer finish
    ours.close()
    writer.join()
