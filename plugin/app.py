"""The Flask application factory; gunicorn serves ``plugin.app:wsgi()``.

``create_app`` wires settings -> backend -> domain -> blueprints and starts no threads (the
scheduler is started by gunicorn's ``post_worker_init`` hook, see ``gunicorn_conf``);
tests pass their own ``domain`` (a fake backend behind the real services).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import time

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from .api import admin, volume_driver
from .api.refusing import refusing_app
from .api.stream_socket import StreamSocket, stream_socket_path
from .announce import DriverAnnouncer
from .cli_bundle import write_bundle
from .api.wire import reply
from .compression import compression
from .config import Settings
from .errors import PluginError
from .history import AutoHistory, ReplicationLog
from .locks import VolumeLocks
from .metrics import Metrics, MetricsServer
from .mounts import MountTable
from .observe import Observer
from .pool import prepare_root
from .quiesce import DockerQuiescer
from .recycle import Recycler, Requests
from .refusal import REFUSAL_ENV, is_managed, start_refusal
from .replication import Replicator
from .roles import RoleBook
from .standby import Standbys
from .scheduler import Scheduler
from .ssh_client import SshClient
from .storage import open_backend
from .domain import Domain
from .trash_book import TrashBook
from .verify_book import VerifyBook
from .verify_docker import DockerChecks, managed_driver

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
              "transfers": settings.transfers,
              "trash": TrashBook(settings.state_dir / "trash.journal"),
              "trash_ttl": settings.trash_ttl, "trash_full": settings.trash_full,
              "verify_book": VerifyBook(settings.state_dir / "verify.json"),
              # the managed plugin's paths are not the host's: it mounts the clone into the
              # check container as a volume of its own driver, not as a bind mount
              "checks": DockerChecks(settings.docker_host, driver=None if settings.publish_dir
                                     is None else managed_driver(settings.docker_host,
                                                                 settings.publish_dir))}
    backend = open_backend(settings)
    # Btrfs: a pool that went away is mounted again; ZFS volumes are re-mounted one by one on
    # Mount (ZfsBackend.attach): nothing to recover
    recover = None if settings.backend == "zfs" else (lambda: prepare_root(settings))
    domain = Domain.assemble(backend, mounts, locks, recover=recover, **extras)
    domain.volumes.open()
    if domain.verifier is not None:
        existing = {v.name for v in backend.volumes()}
        if domain.trash is not None:
            existing |= domain.trash.internal_names()
        domain.verifier.forget_gone(existing)
    return domain


def build_replicator(domain: Domain, settings: Settings) -> Replicator:
    assert domain.replications is not None
    ssh = SshClient(settings.ssh_key, settings.ssh_known_hosts, settings.ssh_dir,
                    settings.remote_snapvol)
    replicator = Replicator(domain.volumes, domain.transfers, domain.lifecycle,
                            domain.replications, ssh=ssh, timeout=settings.transfer_timeout,
                            workers=settings.transfers,
                            compression=compression(settings.stream_compression))
    domain.volumes.create_guards.append(lambda _name, opts: replicator.refuse_unusable(opts))
    return replicator


def leave_host_files(settings: Settings) -> None:
    """Managed plugin: put what the host needs into the data directory: the ``snapvol``
    command (:mod:`plugin.cli_bundle`) and an empty ``ssh/`` for the key and known_hosts the
    plugin reads through its ssh mount. Never a reason not to start."""
    try:
        write_bundle(settings.state_dir / "bin" / "snapvol")
        (settings.state_dir / "ssh").mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        log.error("could not write the snapvol command for the host into %s: %s",
                  settings.state_dir, exc)


def create_app(domain: Domain | None = None,
               environ: Mapping[str, str] | None = None) -> Flask:
    """The WSGI application serving Docker's protocol and the CLI's endpoints."""
    settings = Settings.from_env(os.environ if environ is None else environ)
    if domain is None:
        domain = build_domain(settings)
    replicator = build_replicator(domain, settings) if domain.replications is not None else None
    standbys, roles = None, None
    if replicator is not None and domain.replications is not None:
        roles = RoleBook(settings.state_dir / "roles.json")
        standbys = Standbys(domain.volumes, domain.transfers, domain.backend, domain.mounts,
                            domain.locks, roles,
                            domain.replications, replicator, advertise=settings.advertise or None)
        if domain.trash is not None:        # a trashed volume keeps its role until purged
            domain.trash.records.renamers.append(roles.rename)
        standbys.recover()
        domain.status.role_of = standbys.describe
    app = Flask(__name__)
    app.extensions["snapvol.domain"] = domain
    app.extensions["snapvol.replicator"] = replicator
    app.extensions["snapvol.standbys"] = standbys
    observer = app.extensions["snapvol.observer"] = Observer(domain, roles)
    scheduler = None
    metrics = app.extensions["snapvol.metrics"] = Metrics(
        observer, domain.inflight, backend=domain.backend.kind,
        last_pass=lambda: scheduler.last_pass if scheduler is not None else None)
    _count_outcomes(domain, metrics)
    _time_requests(app, metrics)
    # started by gunicorn's hooks
    scheduler = app.extensions["snapvol.scheduler"] = Scheduler(
        domain.schedules, domain.volumes, replicator=replicator, standbys=standbys,
        trash=domain.trash, verifier=domain.verifier, lateness=metrics.lateness.observe)
    app.extensions["snapvol.recycler"] = _recycler(app, domain, scheduler, settings)
    if settings.metrics is not None:
        app.extensions["snapvol.metrics_server"] = MetricsServer(metrics, settings.metrics)
    if settings.publish_dir is None:       # a host install; dockerd always lists a managed plugin
        app.extensions["snapvol.announcer"] = DriverAnnouncer(settings.docker_host, settings.driver)
    else:
        leave_host_files(settings)
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


def _count_outcomes(domain: Domain, metrics: Metrics) -> None:
    """Failures and bytes are counted where they are recorded (the state files' writers)."""
    if domain.schedules.history is not None:
        domain.schedules.history.on_record(metrics.automatic_run)
    if domain.replications is not None:
        domain.replications.on_record(metrics.replication)


def _time_requests(app: Flask, metrics: Metrics) -> None:
    """Latency and errors per endpoint of the plugin socket. The label is the route (a fixed
    set); a path no route matches counts as ``other``, so no client can grow the labels."""
    @app.before_request
    def started() -> None:
        g.snapvol_started = time.perf_counter()

    @app.after_request
    def answered(response: Response) -> Response:
        started_at = g.get("snapvol_started")
        if started_at is not None:
            rule = request.url_rule
            endpoint = rule.rule.lstrip("/") if rule is not None else "other"
            metrics.request(endpoint, response.status_code, time.perf_counter() - started_at)
        return response


def _recycler(app: Flask, domain: Domain, scheduler: Scheduler, settings: Settings) -> Recycler:
    """The worker's replacement when idle after many volumes went (:mod:`plugin.recycle`);
    started by gunicorn's hooks. It counts the requests being served to know when it is idle."""
    requests = Requests()

    @app.before_request
    def serving() -> None:
        requests.begin()
        g.snapvol_serving = True

    @app.teardown_request
    def served(_exc: BaseException | None) -> None:
        if g.pop("snapvol_serving", False):         # teardown runs even if before did not
            requests.end()

    def count() -> int:
        return len(domain.volumes.known) + (len(domain.trash) if domain.trash is not None else 0)

    def idle() -> bool:
        return (requests.serving == 0 and domain.inflight.running == 0 and domain.locks.idle()
                and not scheduler.passing)

    return Recycler(count=count, idle=idle, drop=settings.recycle_drop,
                    quiet=settings.recycle_quiet)


def wsgi() -> Flask:
    """gunicorn's entry point: like :func:`create_app`, but a configuration or storage problem
    ends the worker with one clear log line (exit 3 makes gunicorn stop instead of retrying).
    A managed plugin serves its refusal instead (:mod:`plugin.api.refusing`): when the master
    decided it must not touch its storage, or when opening the storage fails."""
    if os.environ.get(REFUSAL_ENV):
        return refusing_app(os.environ[REFUSAL_ENV])
    try:
        return create_app()
    except PluginError as exc:
        log.error("snapvol cannot start: %s", exc)
        if is_managed(os.environ):         # an exit would be restarted by dockerd for ever
            return refusing_app(start_refusal(str(exc)))
        raise SystemExit(3) from None
