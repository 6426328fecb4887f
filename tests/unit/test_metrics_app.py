"""The metrics wiring on the fake backend (the real scrape is tests/e2e/test_metrics.py):
endpoint labels stay bounded, outcomes are counted where they are recorded, the server binds
a real TCP port and a port it cannot bind never stops the plugin."""

from __future__ import annotations

import logging
import socket
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from plugin.app import create_app
from plugin.domain import Domain
from plugin.errors import VolumeBusy
from plugin.history import AutoHistory, AutoRun, Replication, ReplicationLog
from plugin.locks import VolumeLocks
from plugin.metrics import MetricsServer
from plugin.mounts import MountTable
from tests.fakes import FakeBackend

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def app(tmp_path: Path):
    domain = Domain.assemble(FakeBackend(tmp_path / "root"), MountTable(tmp_path / "mounts.json"),
                             VolumeLocks(0.5), history=AutoHistory(tmp_path / "schedule.json"),
                             replications=ReplicationLog(tmp_path / "replication.json"),
                             transfers=1)
    domain.backend.check()
    domain.volumes.open()
    return create_app(domain=domain, environ={"SNAPVOL_STATE_DIR": str(tmp_path)})


def samples(app) -> dict[tuple[str, frozenset], float]:
    from prometheus_client import generate_latest
    text = generate_latest(app.extensions["snapvol.metrics"].registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_unknown_paths_share_one_label(app):
    client = app.test_client()
    for i in range(20):
        client.post(f"/Anything.{i}", data=b"{}")
    client.post("/VolumeDriver.Capabilities", data=b"")
    endpoints = {dict(labels)["endpoint"] for name, labels in samples(app)
                 if name == "snapvol_request_duration_seconds_count"}
    assert endpoints == {"other", "VolumeDriver.Capabilities"}
    assert samples(app)[("snapvol_request_errors_total",
                         frozenset({"endpoint": "other", "code": "4xx"}.items()))] == 20


def test_outcomes_are_counted_where_they_are_recorded(app):
    domain = app.extensions["snapvol.domain"]
    domain.schedules.history.record("v", AutoRun(NOW, None, "quiesce failed"))
    domain.schedules.history.record("v", AutoRun(NOW, "auto-1", "pruning failed"))
    domain.schedules.history.record("v", AutoRun(NOW, "auto-2"))
    domain.replications.record("v", Replication("unix:///t.sock", NOW, "s1", None, 4096))
    domain.replications.record("v", Replication("unix:///t.sock", NOW, "s2", "s1", 0, "gone"))
    got = samples(app)
    kind = lambda k: got[("snapvol_failures_total", frozenset({"kind": k}.items()))]  # noqa: E731
    assert (kind("automatic_snapshot"), kind("prune"), kind("replication"), kind("storage")) == \
        (1, 1, 1, 0)
    assert got[("snapvol_replication_sent_bytes_total",
                frozenset({"volume": "v", "target": "unix:///t.sock"}.items()))] == 4096


def test_refused_transfers_and_slots_in_use(app):
    inflight = app.extensions["snapvol.domain"].inflight
    with inflight.slot():
        assert samples(app)[("snapvol_transfers_in_flight", frozenset())] == 1
        with pytest.raises(VolumeBusy):
            inflight.acquire_slot()
    got = samples(app)
    assert got[("snapvol_transfers_refused_total", frozenset())] == 1
    assert got[("snapvol_transfers_in_flight", frozenset())] == 0


def test_the_server_answers_on_tcp_and_stops(app):
    server = MetricsServer(app.extensions["snapvol.metrics"], ("127.0.0.1", 0))
    server.start()
    try:
        host, port = server.bound
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
            assert b"snapvol_info{" in response.read()
    finally:
        server.stop()
    assert server.bound is None


def test_a_port_that_cannot_be_bound_is_logged_and_the_plugin_runs_on(app, caplog):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        server = MetricsServer(app.extensions["snapvol.metrics"], taken.getsockname())
        with caplog.at_level(logging.ERROR, logger="plugin.metrics"):
            server.start()                  # no exception
        assert server.bound is None
        assert "cannot serve on 127.0.0.1" in caplog.text and "SNAPVOL_METRICS" in caplog.text
    finally:
        taken.close()
    assert app.test_client().post("/Plugin.Activate", data=b"").status_code == 200


def test_standbys_and_replicate_targets_carry_their_cadence(tmp_path: Path):
    """The observer names each target's kind and interval: a standby syncs every sync=, a
    replicate= target follows the schedule, one replicated to by hand has no cadence; the
    lag is the age of the snapshot the target holds."""
    from plugin.observe import Observer
    from plugin.roles import PRIMARY, Role, RoleBook

    replications = ReplicationLog(tmp_path / "replication.json")
    domain = Domain.assemble(FakeBackend(tmp_path / "root"), MountTable(tmp_path / "mounts.json"),
                             VolumeLocks(0.5), replications=replications)
    domain.backend.check()
    domain.volumes.open()
    domain.volumes.create("pg", {"schedule": "1h", "replicate": "unix:///r/b.sock"})
    taken = domain.volumes.snapshot(["pg"], "s1")[0]
    roles = RoleBook(tmp_path / "roles.json")
    roles.set("pg", Role(PRIMARY, 1, standbys=("unix:///r/s.sock",), sync="30s"))
    replications.record("pg", Replication("unix:///r/b.sock", NOW, "s1", None, 10))
    replications.record("pg", Replication("unix:///r/hand.sock", NOW, "s1", None, 10))
    facts = Observer(domain, roles).facts(max_age=0)
    (pg,) = facts.volumes
    assert (pg.interval, pg.role, pg.snapshots) == (3600, "primary", 1)
    got = {t.target: (t.kind, t.interval, t.last_success, t.synced_created) for t in pg.targets}
    assert got == {"unix:///r/b.sock": ("replicate", 3600, NOW, taken.created),
                   "unix:///r/s.sock": ("standby", 30, None, None),
                   "unix:///r/hand.sock": ("manual", None, NOW, taken.created)}


def test_validated_restores_are_metrics_of_their_last_result_and_last_success(tmp_path: Path):
    """A volume with verify= carries its interval; its last verification's end and whether
    it failed, and the end of its last one that passed (the batch-job pattern)."""
    from plugin.verify_book import FAILED, PASSED, VerifyBook, VerifyResult

    domain = Domain.assemble(FakeBackend(tmp_path / "root"), MountTable(tmp_path / "mounts.json"),
                             VolumeLocks(0.5), verify_book=VerifyBook(tmp_path / "verify.json"))
    domain.backend.check()
    domain.volumes.open()
    domain.volumes.create("pg", {"verify": "1d", "verify-image": "postgres:16"})
    domain.volumes.create("web", {})
    app = create_app(domain=domain, environ={"SNAPVOL_STATE_DIR": str(tmp_path)})
    book = domain.verifier.book
    book.record(VerifyResult("pg", "s1", PASSED, NOW, 2.0))
    book.record(VerifyResult("pg", "s2", FAILED, NOW.replace(hour=5), 3.0, "bad checksum"))
    got = samples(app)
    pg = frozenset({"volume": "pg"}.items())
    assert got[("snapvol_verify_interval_seconds", pg)] == 86400
    assert got[("snapvol_verify_last_success_timestamp_seconds", pg)] == NOW.timestamp() + 2
    assert got[("snapvol_verify_last_timestamp_seconds", pg)] == NOW.timestamp() + 5 * 3600 + 3
    assert got[("snapvol_verify_last_failed", pg)] == 1
    assert not [key for key in got if key[0].startswith("snapvol_verify") and
                dict(key[1]).get("volume") == "web"]
