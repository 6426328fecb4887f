"""A minimal client of the plugin socket (stdlib only): POST JSON, get ``(status, reply)``."""

from __future__ import annotations

import errno
import fcntl
import glob
import http.client
import json
import os
import select
import socket
import stat
from collections.abc import Callable, Iterable, Mapping
from typing import Any, BinaryIO

LEGACY_SOCKET = "/run/docker/plugins/snapvol.sock"
MANAGED_SOCKETS = "/run/docker/plugins/*/snapvol.sock"


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class UnixHTTP10Connection(UnixHTTPConnection):
    """HTTP/1.0 over a Unix socket, for a stream as the response body: the server then sends
    it as it is, to the end of the connection, instead of in HTTP/1.1 chunks (which gunicorn
    builds by copying every chunk once more, and http.client takes apart in Python)."""

    _http_vsn = 10
    _http_vsn_str = "HTTP/1.0"


class PluginClient:
    """Calls the plugin's endpoints over its socket."""

    def __init__(self, socket_path: str, timeout: float = 300.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def call(self, endpoint: str, body: Mapping[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        """POST *body* to ``/<endpoint>``; return the HTTP status and the decoded reply.

        :raises OSError: the socket cannot be reached (the plugin is not running).
        :raises ValueError: the reply is not a JSON object.
        """
        conn = UnixHTTPConnection(self.socket_path, self.timeout)
        try:
            conn.request("POST", "/" + endpoint, body=json.dumps(body or {}),
                         headers={"Accept": "application/vnd.docker.plugins.v1.2+json"})
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        reply = json.loads(raw) if raw.strip() else {}
        if not isinstance(reply, dict):
            raise ValueError(f"unexpected reply from {self.socket_path}: {raw[:100]!r}")
        return response.status, reply


def find_socket(environ: Mapping[str, str]) -> str:
    """The plugin's socket: ``$SNAPVOL_SOCKET``, else the legacy one, else the one managed one.

    :raises LookupError: none found, or several managed plugins (say which to use).
    """
    if environ.get("SNAPVOL_SOCKET"):
        return environ["SNAPVOL_SOCKET"]
    if os.path.exists(LEGACY_SOCKET):
        return LEGACY_SOCKET
    managed = sorted(glob.glob(MANAGED_SOCKETS))
    if len(managed) == 1:
        return managed[0]
    if managed:
        raise LookupError(f"several snapvol plugins are running ({', '.join(managed)}); "
                          "choose one with --socket or SNAPVOL_SOCKET")
    raise LookupError(f"no snapvol socket found ({LEGACY_SOCKET} or {MANAGED_SOCKETS}); "
                      "is the plugin running? (./scripts/run starts it)")


def send_stream(path: str, volume: str, chunks: Iterable[bytes] | BinaryIO, *,
                timeout: float = 120.0,
                progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Give a framed stream to the plugin's stream socket to receive as *volume*; return its
    answer (the usual envelope, ``Err`` empty on success, ``Status`` the HTTP-like code).

    *chunks* is the stream as bytes objects, or a binary file (``snapvol receive``'s input),
    which the kernel moves to the socket itself where it can (a pipe: splice(2); a regular
    file: sendfile(2)): the bytes never pass through Python, or a plugin's running send (an
    object with ``into(sock, timeout=, progress=)``, see ``plugin.transfers.Transfer``), which
    writes into the socket itself what it does not yield. *progress* is called with the
    bytes given so far.

    :raises OSError: the socket cannot be reached.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"no stream socket {path}: is snapvol 0.2 or "
                                    "later running there?") from None
        sock.sendall(json.dumps({"Op": "receive", "Volume": volume}).encode() + b"\n")
        try:
            if hasattr(chunks, "fileno"):
                forward(chunks, sock, timeout, progress)
            elif hasattr(chunks, "into"):
                for chunk in chunks.into(sock, timeout=timeout, progress=progress):
                    sock.sendall(chunk)
            else:
                done = 0
                for chunk in chunks:
                    sock.sendall(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done)
            sock.shutdown(socket.SHUT_WR)      # end of stream: a short one is seen as truncated
        except (BrokenPipeError, ConnectionResetError):
            pass                               # refused early: the answer says why
        with sock.makefile("rb") as answers:
            line = answers.readline(1 << 16)
    finally:
        sock.close()
    try:
        answer = json.loads(line)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        return {"Err": "the plugin closed the stream without an answer; see its log", "Status": 500}
    return answer


SPLICE_CHUNK = 1 << 20


def forward(source: BinaryIO, sock: socket.socket, timeout: float,
            progress: Callable[[int], None] | None = None) -> int:
    """Copy *source* to its end into *sock* in the kernel: splice(2) from a pipe, sendfile(2)
    from a regular file; read and send for anything else (a terminal, a socket). Returns the
    bytes moved. *sock* may have a timeout (then it is non-blocking: wait for room). Nothing
    of *source* may sit in a Python buffer already: its file descriptor is read."""
    fd = source.fileno()
    done = 0
    mode = os.fstat(fd).st_mode
    move: Callable[[], int]
    if stat.S_ISFIFO(mode):
        def move() -> int:
            return os.splice(fd, sock.fileno(), SPLICE_CHUNK, flags=_SPLICE_F_MOVE | _SPLICE_F_MORE)
    elif stat.S_ISREG(mode):
        offset = os.lseek(fd, 0, os.SEEK_CUR)

        def move() -> int:
            nonlocal offset
            sent = os.sendfile(sock.fileno(), fd, offset, 16 * SPLICE_CHUNK)
            offset += sent
            return sent
    else:
        def move() -> int:
            data = os.read(fd, SPLICE_CHUNK)
            sock.sendall(data)
            return len(data)
    while True:
        try:
            moved = move()
        except BlockingIOError:          # the socket is full (a timeout makes it non-blocking)
            if not select.select([], [sock], [], timeout)[1]:
                raise TimeoutError(f"the receiver took no data for {timeout:.0f} s") from None
            continue
        except OSError as exc:           # a kernel or file system that cannot: copy instead
            if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP) or done:
                raise
            def move() -> int:
                data = os.read(fd, SPLICE_CHUNK)
                sock.sendall(data)
                return len(data)
            continue
        if not moved:
            return done
        done += moved
        if progress is not None:
            progress(done)


def kernel_mover(source: BinaryIO, out: BinaryIO, timeout: float,
                 advance: Callable[[int], None]) -> Callable[[int], None] | None:
    """A *move* for :meth:`plugin.stream.Reader.relay`: each payload goes from the socket under
    *source* (a buffered reader of it) to *out* with splice(2), never through Python, and
    *advance* is told how far. None where *out* is not a pipe (a file, a terminal, a test's
    buffer): the caller then reads the stream itself."""
    try:
        src_fd, out_fd = source.fileno(), out.fileno()
        if not stat.S_ISFIFO(os.fstat(out_fd).st_mode):
            return None
    except (AttributeError, OSError, ValueError):
        return None
    try:   # a 1 MiB pipe instead of 64 KiB: fewer wake-ups on both ends
        fcntl.fcntl(out_fd, _F_SETPIPE_SZ, 1 << 20)
    except OSError:
        pass
    copy = False

    def move(length: int) -> None:
        nonlocal copy
        left = length
        held = source.peek(1)[:left]          # what Python's buffer holds goes on from there
        if held:
            out.write(source.read(len(held)))
            left -= len(held)
            advance(len(held))
        out.flush()
        while left:
            if copy:
                data = source.read(min(left, SPLICE_CHUNK))
                out.write(data)
                moved = len(data)
            else:
                try:
                    moved = os.splice(src_fd, out_fd, min(left, SPLICE_CHUNK), flags=_SPLICE_F_MOVE)
                except BlockingIOError:      # nothing yet (a timeout makes the socket non-blocking)
                    if not select.select([src_fd], [], [], timeout)[0]:
                        raise TimeoutError(f"the plugin sent nothing for {timeout:.0f} s") from None
                    continue
                except OSError as exc:       # a kernel that cannot: through Python instead
                    if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise
                    copy = True
                    continue
            if not moved:
                raise ConnectionError("the stream is truncated (the plugin closed it inside a frame)")
            left -= moved
            advance(moved)
        if copy:
            out.flush()
    return move


_F_SETPIPE_SZ = 1031   # fcntl.F_SETPIPE_SZ (Linux)
_SPLICE_F_MOVE = getattr(os, "SPLICE_F_MOVE", 1)
_SPLICE_F_MORE = getattr(os, "SPLICE_F_MORE", 4)
