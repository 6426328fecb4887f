"""Prometheus metrics: ``/metrics`` on the TCP address ``SNAPVOL_METRICS`` names.

Two kinds of metric live here:

* events counted as they happen, in this process: request latency and errors per Docker or
  CLI endpoint, automatic snapshot / prune / replication failures by kind, bytes replicated,
  scheduler lateness. They start at zero with the process, as Prometheus counters do.
* state read at scrape time by :class:`StateCollector` from :class:`~plugin.observe.Observer`
  (cached for a few seconds): per volume its snapshot count, newest snapshot time, used
  bytes, schedule, validated restores (last one, last success); per replication target its
  last success, lag and bytes; the pool's fill; transfers in flight. These come from the filesystem and the state files, so they survive a
  restart: alerts judge the *age* of the last success (the batch-job pattern), never a single
  failure.

Labels are bounded: volume and target names (as many as there are volumes and targets),
endpoint names from the routing table (anything else is ``other``), fixed failure kinds;
never an error message.

The registry is per application (tests build many apps in one process), and the server is a
small threaded WSGI server started by gunicorn's ``post_worker_init`` in the worker that
serves Docker, never on the plugin's socket.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .history import AutoRun, Replication
from .inflight import InFlight
from .observe import Observer

log = logging.getLogger(__name__)

FAILURE_KINDS = ("automatic_snapshot", "prune", "replication", "storage")
# Docker allows 30 s per call (2 min for a few); snapvol answers most in milliseconds
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120)
LATENESS_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600)


class Metrics:
    """The plugin's metrics registry and the counters the running code feeds."""

    def __init__(self, observer: Observer, inflight: InFlight, *, backend: str,
                 last_pass: Callable[[], datetime | None] = lambda: None,
                 max_age: float = 5.0) -> None:
        """*observer* is read at scrape time (cached *max_age* seconds); *last_pass* tells
        when the scheduler last looked at the schedules (its heartbeat)."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.latency = Histogram("snapvol_request_duration_seconds",
                                 "Time to answer a request on the plugin socket, per endpoint "
                                 "(streams: until the reply starts)", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.request_errors = Counter("snapvol_request_errors", "Requests answered with an "
                                      "error, per endpoint and class (4xx: refused, 5xx: failed)",
                                      ["endpoint", "code"], registry=self.registry)
        self.failures = Counter("snapvol_failures", "Failed background work by kind: "
                                "automatic_snapshot, prune, replication (and standby syncs), "
                                "storage (a scrape could not read it)", ["kind"],
                                registry=self.registry)
        for kind in FAILURE_KINDS:
            self.failures.labels(kind)          # exported as 0 from the start: rate() works
        self.replicated_bytes = Counter("snapvol_replication_sent_bytes",
                                        "Bytes of snapshot data sent by successful "
                                        "replications since the start", ["volume", "target"],
                                        registry=self.registry)
        self.lateness = Histogram("snapvol_scheduler_lateness_seconds",
                                  "How long after its due time each automatic snapshot started",
                                  buckets=LATENESS_BUCKETS, registry=self.registry)
        self.registry.register(StateCollector(observer, inflight, backend, last_pass, max_age,
                                              self.failures))

    def automatic_run(self, volume: str, run: AutoRun) -> None:
        """An :class:`AutoHistory` listener: count a failed snapshot or a failed prune."""
        if run.error:
            self.failures.labels("prune" if run.snapshot else "automatic_snapshot").inc()

    def replication(self, volume: str, run: Replication) -> None:
        """A :class:`ReplicationLog` listener: count a failure, or the bytes sent."""
        if run.error:
            self.failures.labels("replication").inc()
        elif run.bytes:
            self.replicated_bytes.labels(volume, run.target).inc(run.bytes)

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.latency.labels(endpoint).observe(seconds)
        if status >= 400:
            self.request_errors.labels(endpoint, "5xx" if status >= 500 else "4xx").inc()


class StateCollector(Collector):
    """The scrape-time metrics: read from :class:`Observer` (cached), never from counters
    kept in memory, so a restart loses none of them."""

    def __init__(self, observer: Observer, inflight: InFlight, backend: str,
                 last_pass: Callable[[], datetime | None], max_age: float,
                 failures: Counter) -> None:
        self._observer, self._inflight, self._backend = observer, inflight, backend
        self._last_pass, self._max_age, self._failures = last_pass, max_age, failures
        self._failed_at: datetime | None = None

    def describe(self) -> Iterator[Metric]:
        return iter(())        # no pass over the storage when the collector is registered

    def collect(self) -> Iterator[Metric]:
        facts = self._observer.facts(self._max_age)
        if facts.error and facts.at != self._failed_at:   # one failed pass, counted once
            self._failed_at = facts.at
            self._failures.labels("storage").inc()
        info = GaugeMetricFamily("snapvol_info", "snapvol's version and backend (always 1)",
                                 labels=["version", "backend"])
        info.add_metric([__version__, self._backend], 1)
        yield info
        yield _gauge("snapvol_storage_up", "1 when the last pass read the storage, 0 when it "
                     "failed", 0 if facts.error else 1)
        yield _gauge("snapvol_collect_duration_seconds", "How long the last pass over the "
                     "storage took", facts.seconds)
        yield _gauge("snapvol_volumes", "Volumes snapvol owns", len(facts.volumes))
        if facts.pool_size is not None and facts.pool_available is not None:
            yield _gauge("snapvol_pool_size_bytes", "Size of the storage holding the volumes",
                         facts.pool_size)
            yield _gauge("snapvol_pool_available_bytes", "What can still be written to it",
                         facts.pool_available)
        yield _gauge("snapvol_transfers_in_flight", "Sends, receives and replications "
                     "running now", self._inflight.running)
        yield _gauge("snapvol_transfers_limit", "SNAPVOL_TRANSFERS: how many may run at once",
                     self._inflight.limit)
        refused = CounterMetricFamily("snapvol_transfers_refused", "Transfers refused as busy "
                                      "because every slot was taken")
        refused.add_metric([], self._inflight.refused)
        yield refused
        last_pass = self._last_pass()
        if last_pass is not None:
            yield _gauge("snapvol_scheduler_last_pass_timestamp_seconds", "When the scheduler "
                         "last looked at the schedules (its heartbeat)", last_pass.timestamp())
        yield from self._volumes(facts.volumes, facts.at)

    def _volumes(self, volumes, now: datetime) -> Iterator[Metric]:
        def family(name: str, text: str, labels: tuple[str, ...] = ("volume",)) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, text, labels=list(labels))

        created = family("snapvol_volume_created_timestamp_seconds", "When the volume was "
                         "created (a scheduled volume without snapshots is late from then)")
        count = family("snapvol_volume_snapshots", "Snapshots of the volume (all owners)")
        newest = family("snapvol_volume_newest_snapshot_timestamp_seconds",
                        "Creation time of the volume's newest snapshot")
        used = family("snapvol_volume_used_bytes", "Bytes the volume uses (Btrfs: its qgroup's "
                      "referenced bytes where quotas are on; ZFS: referenced)")
        quota = family("snapvol_volume_quota_bytes", "The volume's size limit (size=)")
        interval = family("snapvol_volume_schedule_interval_seconds",
                          "The volume's schedule= interval")
        pair = ("volume", "target")
        success = family("snapvol_replication_last_success_timestamp_seconds",
                         "When the last successful replication to the target ended", pair)
        attempt = family("snapvol_replication_last_attempt_timestamp_seconds",
                         "When the last replication to the target ended, failed or not", pair)
        failed = family("snapvol_replication_last_failed",
                        "1 when the last replication to the target failed", pair)
        lag = family("snapvol_replication_lag_seconds", "Age of the target's copy: now minus "
                     "the creation of the newest snapshot it holds", pair)
        size = family("snapvol_replication_last_bytes",
                      "Bytes of snapshot data the last successful replication sent", pair)
        every = family("snapvol_replication_interval_seconds", "How often the target is due "
                       "(replicate=: the schedule; standby: its sync=); absent for targets "
                       "replicated to by hand", ("volume", "target", "kind"))
        verify_every = family("snapvol_verify_interval_seconds", "The volume's verify= interval")
        verify_last = family("snapvol_verify_last_timestamp_seconds",
                             "When the volume's last validated restore ended, passed or not")
        verify_failed = family("snapvol_verify_last_failed", "1 when the volume's last "
                               "validated restore failed or could not run")
        verify_success = family("snapvol_verify_last_success_timestamp_seconds",
                                "When the volume's last validated restore that passed ended")
        for v in volumes:
            if v.verify is not None:
                if v.verify.interval:
                    verify_every.add_metric([v.name], v.verify.interval)
                if v.verify.last is not None:
                    verify_last.add_metric([v.name], v.verify.last.timestamp())
                    verify_failed.add_metric([v.name], 1 if v.verify.last_failed else 0)
                if v.verify.last_success is not None:
                    verify_success.add_metric([v.name], v.verify.last_success.timestamp())
            if v.created is not None:
                created.add_metric([v.name], v.created.timestamp())
            count.add_metric([v.name], v.snapshots)
            if v.newest is not None:
                newest.add_metric([v.name], v.newest.timestamp())
            if v.used_bytes is not None:
                used.add_metric([v.name], v.used_bytes)
            if v.quota_bytes:
                quota.add_metric([v.name], v.quota_bytes)
            if v.interval:
                interval.add_metric([v.name], v.interval)
            for t in v.targets:
                labels = [v.name, t.target]
                if t.last_success is not None:
                    success.add_metric(labels, t.last_success.timestamp())
                    size.add_metric(labels, t.last_bytes)
                if t.last_attempt is not None:
                    attempt.add_metric(labels, t.last_attempt.timestamp())
                    failed.add_metric(labels, 1 if t.last_failed else 0)
                if t.synced_created is not None:
                    lag.add_metric(labels, max(0.0, (now - t.synced_created).total_seconds()))
                if t.interval:
                    every.add_metric([*labels, t.kind], t.interval)
        yield from (created, count, newest, used, quota, interval, success, attempt, failed, lag,
                    size, every, verify_every, verify_last, verify_failed, verify_success)


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, value=value)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:   # a scrape is no news
        pass


class MetricsServer:
    """``/metrics`` over HTTP on *address*, in a thread of the worker.

    :meth:`start` never raises: an address that cannot be bound (taken, not local) is logged
    as an error and the plugin serves Docker without metrics; Prometheus then sees the target
    down (``up == 0``), which is what its alerts watch.
    """

    def __init__(self, metrics: Metrics, address: tuple[str, int]) -> None:
        self._metrics, self._address = metrics, address
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def bound(self) -> tuple[str, int] | None:
        """The address served (None: not serving)."""
        return None if self._server is None else self._server.server_address[:2]

    def start(self) -> None:
        host, port = self._address
        app = make_wsgi_app(self._metrics.registry)
        try:
            self._server = make_server(host, port, app, _Server6 if ":" in host else _Server,
                                       handler_class=_QuietHandler)
        except OSError as exc:
            log.error("metrics: cannot serve on %s:%d (SNAPVOL_METRICS): %s; the plugin runs "
                      "on without /metrics", host, port, exc.strerror or exc)
            return
        self._thread = threading.Thread(target=self._server.serve_forever, name="snapvol-metrics",
                                        daemon=True)
        self._thread.start()
        log.info("metrics: serving /metrics on %s:%d", host, port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
