"""client.forward: snapvol receive's input reaches the stream socket whole, moved by the
kernel from a pipe (splice) or a file (sendfile), also when the socket is full for a while."""

from __future__ import annotations

import os
import struct
import socket
import threading

import pytest

from plugin import client, stream

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


def relayed(raw: bytes) -> tuple[bytes, stream.Reader]:
    """*raw* from a socket (as snapvol send reads the plugin's answer) into a pipe through
    Reader.relay with kernel_mover, as snapvol send does into `| snapvol receive`."""
    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    feeder = threading.Thread(target=lambda: (theirs.sendall(raw), theirs.shutdown(socket.SHUT_WR)))
    feeder.start()
    r, w = os.pipe()
    got: list[bytes] = []
    drainer = threading.Thread(target=lambda: got.extend(iter(lambda: os.read(r, 1 << 16), b"")))
    drainer.start()
    source = ours.makefile("rb")
    out = os.fdopen(w, "wb")
    reader = stream.Reader(source)
    counted = []
    try:
        reader.header()
        move = client.kernel_mover(source, out, 5, counted.append)
        assert move is not None
        try:
            reader.relay(move)
        finally:
            out.close()
    finally:
        feeder.join(10)
        drainer.join(10)
        source.close()
        ours.close()
        theirs.close()
        os.close(r)
    return b"".join(got), reader


def test_relay_moves_the_frames_through_the_kernel_and_checks_their_structure():
    raw = b"".join(stream.encode({"backend": "btrfs"}, [DATA]))
    at = raw.index(b"D", len(stream.MAGIC) + 5)          # the first data frame
    got, reader = relayed(raw)
    # what went into the pipe: the payloads (the caller's tee writes the framing itself)
    assert got == DATA and reader.bytes == len(DATA) and at > 0
    with pytest.raises((stream.StreamError, ConnectionError), match="truncated"):
        relayed(raw[:-100])                                   # inside the last frame
    with pytest.raises(stream.StreamError, match="truncated"):
        relayed(raw[:-21])                                    # the end mark missing
    bad_end = raw[:-16] + struct.pack(">QII", len(DATA) - 1, 6, 0)
    with pytest.raises(stream.StreamError, match="integrity"):
        relayed(bad_end)


def test_relay_reports_a_sender_failure():
    def failing():
        yield DATA[:3000]
        raise RuntimeError("btrfs send: disk error")
    chunks = []
    with pytest.raises(RuntimeError):
        for piece in stream.encode({"backend": "btrfs"}, failing()):
            chunks.append(piece)
    with pytest.raises(stream.StreamError, match="the sender failed: btrfs send: disk error"):
        relayed(b"".join(chunks))
