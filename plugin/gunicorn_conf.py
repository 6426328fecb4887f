"""gunicorn configuration: ``gunicorn -c python:plugin.gunicorn_conf``.

One worker with threads: the mount table and volume locks live in one process's memory, so
more workers would break them. The master takes the single-instance lock on the state
directory in ``on_starting``, before gunicorn binds the socket, because gunicorn replaces an
existing socket file unconditionally and a second instance would otherwise steal it.

The master imports only what ``on_starting`` needs (no Flask, no libzfs_core: see
``plugin.storage``), so that it starts quickly; the worker imports the application after the
bind. The managed plugin does not even wait for that: ``plugin.prebind`` listens on its
socket before gunicorn starts and hands it over (systemd socket activation), so there is no
socket to steal, and a start-up problem is served as a refusal instead of ending the plugin.
"""

from __future__ import annotations

import os
import socket as _socket

from plugin.config import Settings
from plugin.refusal import REFUSAL_ENV, is_managed, managed_plugin_refusal, start_refusal
from plugin.errors import AlreadyRunning, ConfigError, PluginError
from plugin.locks import single_instance
from plugin.serve import give_back_freed_memory
from plugin.storage import check_storage

os.environ.pop(REFUSAL_ENV, None)      # only this master decides to refuse
try:
    _settings = Settings.from_env(os.environ)
except ConfigError as _problem:
    if not is_managed(os.environ):
        raise
    # the socket already listens (plugin.prebind): serve the reason, on default settings
    os.environ[REFUSAL_ENV] = start_refusal(str(_problem))
    _settings = Settings.from_env({})

wsgi_app = "plugin.app:wsgi()"
bind = [f"unix:{_settings.socket}"]
umask = 0o177                     # the socket is 0600: only root (dockerd) may talk to it
workers = 1
worker_class = "gthread"
threads = _settings.threads
timeout = 150                     # beyond Docker's longest per-call deadline (2 min)
graceful_timeout = 20
pidfile = os.environ.get("SNAPVOL_PIDFILE") or None
# gunicorn 24+ opens a control socket in ~/.gunicorn by default: one path for every instance
# on the host (tests run several), and a way in that nobody asked for. Older gunicorn (Debian's
# 20.1) ignores the name.
control_socket_disable = True
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


def _socket_inherited() -> bool:
    """Whether ``plugin.prebind`` handed us a listening socket (gunicorn reads and clears
    these variables after ``on_starting``)."""
    return os.environ.get("LISTEN_PID") == str(os.getpid())


def on_starting(server) -> None:
    """Refuse to start beside another instance (same state, or a live socket), or on storage
    that cannot be used: all before gunicorn binds the socket (see ``check_storage``).

    A managed plugin starts anyway, refusing every call with the reason
    (``plugin.api.refusing``): its socket may already listen (``plugin.prebind``), and
    dockerd would hide the reason of an exit and restart it for ever."""
    managed = is_managed(os.environ)
    if os.environ.get(REFUSAL_ENV):
        server.log.error("%s", os.environ[REFUSAL_ENV])
        return
    try:
        # A host install waits for the worker of a killed master to notice and exit; a managed
        # plugin need not (its processes die with the plugin's pid namespace) and must not:
        # dockerd gives up on a socket that does not accept within about 10 s.
        server.snapvol_lock = single_instance(
            _settings.state_dir, wait=2.0 if managed else 10.0,
            who="a managed Docker plugin" if managed else "a host install")
    except AlreadyRunning as exc:
        if not managed:
            raise SystemExit(f"snapvol: {exc}") from None
        os.environ[REFUSAL_ENV] = managed_plugin_refusal(str(exc))
        server.log.error("snapvol: %s", os.environ[REFUSAL_ENV])
        _settings.socket.parent.mkdir(parents=True, exist_ok=True)
        return
    except PluginError as exc:
        raise SystemExit(f"snapvol: {exc}") from None
    if not _socket_inherited() and _socket_answers(str(_settings.socket)):
        raise SystemExit(f"snapvol: another process already serves {_settings.socket}; "
                         "stop it or set SNAPVOL_SOCKET")
    try:
        check_storage(_settings)
    except PluginError as exc:
        if not managed:
            raise SystemExit(f"snapvol cannot start: {exc}") from None
        os.environ[REFUSAL_ENV] = start_refusal(str(exc))
        server.log.error("%s", os.environ[REFUSAL_ENV])
    _settings.socket.parent.mkdir(parents=True, exist_ok=True)   # a stale file is replaced


def post_worker_init(worker) -> None:
    """Start the scheduler, the stream socket and the metrics server of the app this worker
    loaded (``create_app`` starts no thread). The metrics server lives here, in the worker
    that holds the state it reports, never in the master or on the plugin socket. Before
    them, glibc is told to give freed memory back (:func:`plugin.serve.give_back_freed_memory`)."""
    give_back_freed_memory()
    for name in ("snapvol.streams", "snapvol.scheduler", "snapvol.announcer",
                 "snapvol.metrics_server", "snapvol.recycler"):
        part = worker.wsgi.extensions.get(name)
        if part is not None:
            part.start()


def worker_exit(server, worker) -> None:
    """Stop the scheduler (a run in progress finishes first), the stream socket and the
    rest. Also when the worker asked to be replaced (:mod:`plugin.recycle`)."""
    app = getattr(worker, "wsgi", None)
    if app is None:
        return
    scheduler = app.extensions.get("snapvol.scheduler")
    if scheduler is not None:
        scheduler.stop(timeout=graceful_timeout - 2)
    streams = app.extensions.get("snapvol.streams")
    if streams is not None:
        streams.stop()
    for name in ("snapvol.announcer", "snapvol.metrics_server", "snapvol.recycler"):
        part = app.extensions.get(name)
        if part is not None:
            part.stop()
