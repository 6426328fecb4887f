"""Moving a native stream from its sender's pipe into a socket as stream frames, in the kernel.

A format 3 stream (:mod:`plugin.stream`) has no check of ours over its data, so the plugin
need not see the data at all: each frame's payload goes from the ``btrfs send`` or ``zfs
send`` pipe to the socket with splice(2), which hands the pipe's pages on instead of copying
them into Python and out again (that copy, and zeroing a fresh 1 MiB buffer for every
frame, was most of the CPU the sending plugin added to the native pipe).
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
from collections.abc import Callable

_SPLICE_F_MOVE = getattr(os, "SPLICE_F_MOVE", 1)
_SPLICE_F_MORE = getattr(os, "SPLICE_F_MORE", 4)
_F_SETPIPE_SZ = 1031   # fcntl.F_SETPIPE_SZ (Linux)


def splice_frames(source: int, sock: socket.socket, frame: int, head: Callable[[int], bytes], *,
                  timeout: float | None = None,
                  progress: Callable[[int], None] | None = None) -> tuple[int, int]:
    """Move everything the pipe *source* gives, to its end, into *sock* as frames of at most
    *frame* bytes, each after ``head(length)``; return the bytes and frames moved.

    A frame is gathered in a pipe of our own first (splice(2) between pipes moves page
    references, it copies nothing): its length is then known before its head is written, and
    frames are whole (*frame* bytes) even where the sender writes in small pieces, so every
    later hop (the CLI's relay, the receiving plugin) handles few frames. A frame ends early
    when the sender ends, or when our pipe has no slot left (pieces smaller than a page each
    take one); it never waits for room in it, so it cannot wait on itself. *sock* may have
    a timeout (it is then non-blocking): a receiver that takes nothing for *timeout* seconds
    ends the stream with :class:`TimeoutError`.

    :raises OSError: the socket broke (the client went away) or splice(2) is not available.
    """
    total = frames = 0
    out = sock.fileno()
    gathered, gathering = os.pipe()
    try:
        try:
            fcntl.fcntl(gathering, _F_SETPIPE_SZ, frame)
        except OSError:
            pass       # above /proc/sys/fs/pipe-max-size: frames end when it is full
        # non-blocking into our pipe: a splice that would wait (the sender has nothing yet,
        # or our pipe is full) says so instead, and the poll below tells which
        os.set_blocking(gathering, False)
        waiting = select.poll()
        waiting.register(source, select.POLLIN)
        ended = False
        while not ended:
            filled = 0
            while filled < frame:
                try:
                    moved = os.splice(source, gathering, frame - filled, flags=_SPLICE_F_MOVE)
                except BlockingIOError:
                    if filled and any(e & select.POLLIN for _, e in waiting.poll(0)):
                        break                     # the sender has more: our pipe is full
                    waiting.poll()                # wait for the sender (or its end)
                    continue
                if not moved:
                    ended = True                  # the sender closed its end
                    break
                filled += moved
            if filled:
                sock.sendall(head(filled))
                _splice_all(gathered, out, filled, timeout)
                total += filled
                frames += 1
                if progress is not None:
                    progress(total)
        return total, frames
    finally:
        os.close(gathered)
        os.close(gathering)


def _splice_all(source: int, out: int, length: int, timeout: float | None) -> None:
    """*length* bytes, which the pipe *source* holds, into the socket *out*."""
    while length:
        try:
            moved = os.splice(source, out, length, flags=_SPLICE_F_MOVE | _SPLICE_F_MORE)
        except BlockingIOError:                   # the socket is full (it has a timeout)
            if not select.select([], [out], [], timeout)[1]:
                raise TimeoutError(f"the receiver took no data for {timeout:.0f} s") from None
            continue
        if not moved:                             # cannot be: the pipe holds them
            raise OSError("splice(2) moved nothing from a pipe that holds data")
        length -= moved
