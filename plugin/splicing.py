"""Moving a native stream from its sender's pipe into a socket as stream frames, in the kernel.

A format 3 stream (:mod:`plugin.stream`) has no check of ours over its data, so the plugin
need not see the data at all: each frame's payload goes from the ``btrfs send`` pipe to the
socket with splice(2), which hands the pipe's pages on instead of copying them into Python
and out again (that copy, and zeroing a fresh 1 MiB buffer for every frame, was most of the
CPU the sending plugin added to the native pipe).
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
import termios
from collections.abc import Callable

_SPLICE_F_MOVE = getattr(os, "SPLICE_F_MOVE", 1)
_SPLICE_F_MORE = getattr(os, "SPLICE_F_MORE", 4)


def splice_frames(source: int, sock: socket.socket, frame: int, head: Callable[[int], bytes], *,
                  timeout: float | None = None,
                  progress: Callable[[int], None] | None = None) -> tuple[int, int]:
    """Move everything the pipe *source* gives, to its end, into *sock* as frames of at most
    *frame* bytes, each after ``head(length)``; return the bytes and frames moved.

    A frame holds what the pipe holds when it is taken (FIONREAD): the payload is then in the
    pipe already, so the length written ahead of it is the length that follows, whatever the
    sender does next. Where the sender is the slower side the frames are short; where the
    receiver is (btrfs receive costs about twice btrfs send), the pipe is full and so are
    the frames. *sock* may have a timeout (it is then non-blocking): a receiver that takes
    nothing for *timeout* seconds ends the stream with :class:`TimeoutError`.

    :raises OSError: the socket broke (the client went away) or splice(2) is not available.
    """
    total = frames = 0
    count = bytearray(4)
    out = sock.fileno()
    poller = select.poll()
    poller.register(source, select.POLLIN)
    while True:
        poller.poll()                             # data, or the sender closed the pipe
        fcntl.ioctl(source, termios.FIONREAD, count)
        ready = min(struct.unpack("i", count)[0], frame)
        if not ready:
            return total, frames                  # woken with nothing to read: end of stream
        sock.sendall(head(ready))
        left = ready
        while left:
            try:
                moved = os.splice(source, out, left, flags=_SPLICE_F_MOVE | _SPLICE_F_MORE)
            except BlockingIOError:               # the socket is full (it has a timeout)
                if not select.select([], [out], [], timeout)[1]:
                    raise TimeoutError(f"the receiver took no data for {timeout:.0f} s") from None
                continue
            if not moved:                         # cannot be: FIONREAD said it is there
                raise OSError("splice(2) moved nothing from a pipe that holds data")
            left -= moved
        total += ready
        frames += 1
        if progress is not None:
            progress(total)
