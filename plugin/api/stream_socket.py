"""The stream socket: received streams go here instead of through an HTTP body.

gunicorn parses a request body in Python, 8 KiB at a time, which caps one stream at a few
hundred MiB/s of CPU; a stream is bulk data with its own framing and checksum, so beside the
HTTP socket the plugin listens on ``<SNAPVOL_SOCKET>.stream`` (mode 0600, not ``.sock``, so
dockerd's plugin discovery never takes it for a driver). The protocol is one JSON request
line, ``{"Op": "receive", "Volume": NAME}``, then the framed stream; the answer is one JSON
line in the usual envelope (``{"Err": "", "Snapshot": ..., "Base": ..., "Bytes": ...}``).
Started and stopped with the scheduler by gunicorn's worker hooks.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from pathlib import Path

from ..errors import InvalidRequest, PluginError
from ..transfers import Transfers

log = logging.getLogger(__name__)

MAX_REQUEST_LINE = 4096


def stream_socket_path(http_socket: Path) -> Path:
    return http_socket.with_name(http_socket.name + ".stream")


class StreamSocket:
    """Serves ``receive`` on a Unix socket, one thread per connection (the transfer
    slots bound how many run)."""

    def __init__(self, transfers: Transfers, path: Path, *, timeout: float = 120.0) -> None:
        self._transfers = transfers
        self.path = path
        self._timeout = timeout
        self._listener: socket.socket | None = None

    def start(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            self.path.unlink(missing_ok=True)        # stale: the single-instance lock is ours
            listener.bind(str(self.path))
        finally:
            os.umask(old_umask)
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, name="snapvol-streams", daemon=True).start()
        log.info("stream socket at %s", self.path)

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self.path.unlink(missing_ok=True)

    def _accept(self) -> None:
        listener = self._listener
        while listener is not None:
            try:
                conn, _ = listener.accept()
            except OSError:
                return                                # closed by stop()
            threading.Thread(target=self._serve, args=(conn,), name="snapvol-stream",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(self._timeout)
            # a small buffer: a frame header read into it pulls only a little of the payload
            # along, which then goes through Python instead of being spliced (a 64 KiB buffer
            # took up to 64 KiB of every frame; larger reads bypass the buffer anyway)
            source = conn.makefile("rb", buffering=512)
            try:
                request = json.loads(source.readline(MAX_REQUEST_LINE) or b"null")
                if not isinstance(request, dict) or request.get("Op") != "receive":
                    raise InvalidRequest('expected {"Op": "receive", "Volume": NAME} on the first line')
                result = self._transfers.receive(request.get("Volume"), source, idle=self._timeout)
                answer = {"Err": "", "Snapshot": result["snapshot"], "Base": result["base"],
                          "Bytes": result["bytes"]}
            except PluginError as exc:
                log.warning("stream receive refused: %s", exc)
                answer = {"Err": str(exc), "Status": exc.http_status}
            except ValueError:
                answer = {"Err": "the request line is not JSON", "Status": 400}
            except OSError as exc:
                log.warning("stream receive: connection lost: %s", exc)
                return
            except Exception:    # our bug: the traceback stays in the log
                log.exception("stream receive failed")
                answer = {"Err": "internal error in snapvol; see the plugin log", "Status": 500}
            finally:
                source.close()
            try:
                conn.sendall(json.dumps(answer).encode() + b"\n")
            except OSError:
                pass
