"""gunicorn configuration: ``gunicorn -c python:plugin.gunicorn_conf``.

One worker with threads: the mount table and volume locks live in one process's memory, so
more workers would break them. The master takes the single-instance lock on the state
directory in ``on_starting``, before gunicorn binds the socket, because gunicorn replaces an
existing socket file unconditionally and a second instance would otherwise steal it.

The master imports only what ``on_starting`` needs (no Flask, no libzfs_core: see
``plugin.storage``), so that it binds within dockerd's start window; the worker imports the
application after the bind.
"""

from __future__ import annotations

import os
import socket as _socket

from plugin.config import Settings
from plugin.errors import PluginError
from plugin.locks import single_instance
from plugin.storage import check_storage

_settings = Settings.from_env(os.environ)

wsgi_app = "plugin.app:wsgi()"
bind = [f"unix:{_settings.socket}"]
umask = 0o177                     # the socket is 0600: only root (dockerd) may talk to it
workers = 1
worker_class = "gthread"
threads = _settings.threads
timeout = 150                     # beyond Docker's longest per-call deadline (2 min)
graceful_timeout = 20
pidfile = os.environ.get("SNAPVOL_PIDFILE") or None
loglevel = _settings.log_level
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain",
                            "stream": "ext://sys.stderr"}},
    "root": {"handlers": ["stderr"], "level": _settings.log_level.upper()},
    "loggers": {
        "gunicorn.error": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        "gunicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
    },
}


def _socket_answers(path: str) -> bool:
    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def on_starting(server) -> None:
    """Refuse to start beside another instance (same state, or a live socket), or on storage
    that cannot be used: all before gunicorn binds the socket (see ``check_storage``)."""
    try:
        server.snapvol_lock = single_instance(_settings.state_dir)
    except PluginError as exc:
        raise SystemExit(f"snapvol: {exc}") from None
    if _socket_answers(str(_settings.socket)):
        raise SystemExit(f"snapvol: another process already serves {_settings.socket}; "
                         "stop it or set SNAPVOL_SOCKET")
    try:
        check_storage(_settings)
    except PluginError as exc:
        raise SystemExit(f"snapvol cannot start: {exc}") from None
    _settings.socket.parent.mkdir(parents=True, exist_ok=True)   # a stale file is replaced


def post_worker_init(worker) -> None:
    """Start the scheduler and the stream socket of the app this worker loaded
    (``create_app`` starts no thread)."""
    for name in ("snapvol.streams", "snapvol.scheduler", "snapvol.announcer"):
        part = worker.wsgi.extensions.get(name)
        if part is not None:
            part.start()


def worker_exit(server, worker) -> None:
    """Stop the scheduler (a run in progress finishes first) and the stream socket."""
    app = getattr(worker, "wsgi", None)
    if app is None:
        return
    scheduler = app.extensions.get("snapvol.scheduler")
    if scheduler is not None:
        scheduler.stop(timeout=graceful_timeout - 2)
    streams = app.extensions.get("snapvol.streams")
    if streams is not None:
        streams.stop()
    announcer = app.extensions.get("snapvol.announcer")
    if announcer is not None:
        announcer.stop()
