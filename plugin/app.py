"""The Flask application factory; gunicorn serves ``plugin.app:wsgi()``.

``create_app`` wires settings -> backend -> domain -> blueprints and starts no threads (the
scheduler is started by gunicorn's ``post_worker_init`` hook, see ``gunicorn_conf``);
tests pass their own ``domain`` (a fake backend behind the real services).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from .api import admin, volume_driver
from .api.stream_socket import StreamSocket, stream_socket_path
from .announce import DriverAnnouncer
from .api.wire import reply
from .config import Settings
from .errors import PluginError
from .history import AutoHistory, ReplicationLog
from .locks import VolumeLocks
from .mounts import MountTable
from .pool import prepare_root
from .quiesce import DockerQuiescer
from .replication import Replicator
from .roles import RoleBook
from .standby import Standbys
from .scheduler import Scheduler
from .storage import open_backend
from .domain import Domain

log = logging.getLogger(__name__)


def build_domain(settings: Settings) -> Domain:
    """The production domain for *settings*: storage made reachable, backend, mount table.

    :raises BackendUnavailable: the storage cannot be prepared or checked.
    """
    settings.mount_table.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    mounts, locks = MountTable(settings.mount_table), VolumeLocks(settings.lock_timeout)
    extras = {"history": AutoHistory(settings.state_dir / "schedule.json"),
              "quiescer": DockerQuiescer(settings.docker_host, hook_timeout=settings.hook_timeout),
              "replications": ReplicationLog(settings.state_dir / "replication.json"),
              "transfers": settings.transfers}
    backend = open_backend(settings)
    # Btrfs: a pool that went away is mounted again; ZFS volumes are re-mounted one by one on
    # Mount (ZfsBackend.attach): nothing to recover
    recover = None if settings.backend == "zfs" else (lambda: prepare_root(settings))
    domain = Domain.assemble(backend, mounts, locks, recover=recover, **extras)
    domain.volumes.open()
    return domain


def build_replicator(domain: Domain, settings: Settings) -> Replicator:
    assert domain.replications is not None
    return Replicator(domain.volumes, domain.transfers, domain.lifecycle, domain.replications,
                      ssh_key=settings.ssh_key,
                      known_hosts=settings.ssh_known_hosts, remote_snapvol=settings.remote_snapvol,
                      timeout=settings.transfer_timeout, workers=settings.transfers)


def create_app(domain: Domain | None = None,
               environ: Mapping[str, str] | None = None) -> Flask:
    """The WSGI application serving Docker's protocol and the CLI's endpoints."""
    settings = Settings.from_env(os.environ if environ is None else environ)
    if domain is None:
        domain = build_domain(settings)
    replicator = build_replicator(domain, settings) if domain.replications is not None else None
    standbys = None
    if replicator is not None and domain.replications is not None:
        standbys = Standbys(domain.volumes, domain.transfers, domain.backend, domain.mounts,
                            domain.locks, RoleBook(settings.state_dir / "roles.json"),
                            domain.replications, replicator, advertise=settings.advertise or None)
        standbys.recover()
        domain.status.role_of = standbys.describe
    app = Flask(__name__)
    app.extensions["snapvol.domain"] = domain
    app.extensions["snapvol.replicator"] = replicator
    app.extensions["snapvol.standbys"] = standbys
    # started by gunicorn's hooks
    app.extensions["snapvol.scheduler"] = Scheduler(domain.schedules, domain.volumes,
                                                     replicator=replicator, standbys=standbys)
    if settings.publish_dir is None:       # a host install; dockerd always lists a managed plugin
        app.extensions["snapvol.announcer"] = DriverAnnouncer(settings.docker_host, settings.driver)
    app.extensions["snapvol.streams"] = StreamSocket(
        domain.transfers, stream_socket_path(settings.socket), timeout=settings.transfer_timeout)
    app.register_blueprint(volume_driver.bp)
    app.register_blueprint(admin.bp)

    @app.errorhandler(PluginError)
    def plugin_error(exc: PluginError) -> Response:
        level = logging.WARNING if exc.http_status < 500 else logging.ERROR
        log.log(level, "%s refused: %s", request.path, exc)
        return reply(exc.http_status, Err=str(exc))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        if exc.code == 404:
            message = f"unknown endpoint {request.path[:100]!r}"
        elif exc.code == 405:
            message = f"{request.path[:100]} accepts only POST"
        else:
            message = f"{exc.name}: {exc.description}"
        log.warning("%s %s: %s", request.method, request.path[:100], message)
        return reply(exc.code or 500, Err=message)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        # Our bug, not the client's: full traceback in our log, one line to the client.
        log.exception("internal error while serving %s", request.path)
        return reply(500, Err=f"internal error in snapvol ({type(exc).__name__}); "
                               "see the plugin log")

    return app


def wsgi() -> Flask:
    """gunicorn's entry point: like :func:`create_app`, but a configuration or storage problem
    ends the worker with one clear log line (exit 3 makes gunicorn stop instead of retrying)."""
    try:
        return create_app()
    except PluginError as exc:
        log.error("snapvol cannot start: %s", exc)
        raise SystemExit(3) from None
