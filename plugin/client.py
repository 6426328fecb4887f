"""A minimal client of the plugin socket (stdlib only): POST JSON, get ``(status, reply)``."""

from __future__ import annotations

import errno
import glob
import http.client
import json
import os
import socket
from collections.abc import Iterable, Mapping
from typing import Any

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


def send_stream(path: str, volume: str, chunks: Iterable[bytes], *,
                timeout: float = 120.0) -> dict[str, Any]:
    """Give a framed stream to the plugin's stream socket to receive as *volume*; return its
    answer (the usual envelope, ``Err`` empty on success, ``Status`` the HTTP-like code).

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
            for chunk in chunks:
                sock.sendall(chunk)
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
