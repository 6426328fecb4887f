"""The managed plugin's entry point: listen on the plugin socket first, then start gunicorn.

``python3 -m plugin.prebind GUNICORN-ARGV...`` binds and listens on ``$SNAPVOL_SOCKET``,
hands the listening socket to gunicorn the way systemd socket activation does (fd 3,
``LISTEN_FDS=1``, ``LISTEN_PID`` = our pid, kept across ``exec``) and execs it. gunicorn then
serves that socket instead of binding its own (``gunicorn.systemd.listen_fds``).

Why: dockerd dials a managed plugin's socket for about 12 s after starting it (at
``enable``, ``install``, and every restart after a crash: 0.5 s, then 4 tries 3 s apart),
then disables the plugin for good (PROTOCOL.md section 5.3). A connect to a listening Unix
socket succeeds before anything accepts, so what counts is how soon the socket listens.
gunicorn binds only after importing itself (pkg_resources alone is more than half of its
start), its configuration and the storage checks; on a loaded or slow machine (the emulated
OpenZFS test VM) that missed dockerd's window. This module imports nothing but the standard
library's ``os`` and ``socket`` and listens within a Python start-up.

The price: a plugin that cannot work no longer fails to enable, so it must not exit either
(dockerd restarts a plugin that exits, at once, for ever). It serves every call with the
reason instead (``plugin.refusal``, ``plugin.gunicorn_conf.on_starting``).
"""

from __future__ import annotations

import os
import socket
import sys

DEFAULT_SOCKET = "/run/docker/plugins/snapvol.sock"   # plugin.config's SNAPVOL_SOCKET default
LISTEN_FD = 3                                          # SD_LISTEN_FDS_START
BACKLOG = 128


def listen(path: str) -> socket.socket:
    """A Unix stream socket listening at *path*, mode 0600 (only root, i.e. dockerd, may
    connect). A stale file at *path* is replaced: the managed plugin's socket directory is
    its own (dockerd's exec root for this plugin), nobody else can be serving there."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old_umask)
    listener.listen(BACKLOG)
    return listener


def main(argv: list[str]) -> None:
    """Listen, then exec *argv* (gunicorn and its arguments) with the socket as fd 3."""
    if not argv:
        raise SystemExit("usage: python3 -m plugin.prebind GUNICORN [ARGS...]")
    path = os.environ.get("SNAPVOL_SOCKET") or DEFAULT_SOCKET
    if os.path.isabs(path):            # otherwise gunicorn's configuration says what is wrong
        listener = listen(path)
        if listener.fileno() != LISTEN_FD:
            os.dup2(listener.fileno(), LISTEN_FD)     # dup2 makes fd 3 inheritable
            listener.close()
        else:
            os.set_inheritable(LISTEN_FD, True)
        os.environ["LISTEN_FDS"] = "1"
        os.environ["LISTEN_PID"] = str(os.getpid())   # exec keeps the pid
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
