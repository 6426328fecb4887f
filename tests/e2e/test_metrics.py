"""Metrics and freshness of a real plugin: snapvol under gunicorn on a small Btrfs pool and on
a ZFS pool (zfs-fuse here), with ``SNAPVOL_METRICS`` on a free loopback port, scraped over TCP
and parsed with prometheus_client's own parser; a second instance is the replication target.

Every value is checked against what was done to the plugin: a Docker protocol call, a
snapshot, written data, a replication that succeeds and one that fails, an automatic snapshot
that fails for real (its ``quiesce=pause`` needs a Docker that does not answer). Then
``snapvol check --freshness`` answers OK, WARN once that schedule is really late, and CRIT once
the small pool is really full. No dockerd is needed: the Docker calls are made on the plugin
socket exactly as dockerd makes them.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from plugin.cli import main
from tests.conftest import destroy_pool, make_pool, need, write_until_refused
from tests.e2e.conftest import LANE
from tests.e2e.harness import PluginProcess, free_port, mounts_under, unique
from tests.unit.test_monitoring import referenced_metrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
NO_DOCKER = "unix:///run/snapvol-metrics-test-no-docker.sock"   # nothing listens there
VERIFY_SERIES = {"snapvol_verify_last_success_timestamp_seconds", "snapvol_verify_interval_seconds"}


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def until(port: int, ready: Callable[[Samples], bool], timeout: float = 30,
          instance: PluginProcess | None = None) -> Samples:
    """Scrape until *ready* (state metrics are cached for up to 5 s, and qgroups and ZFS
    space accounting follow the data at their next commit)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if ready(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not reached in {timeout} s; storage_up={value(samples, 'snapvol_storage_up')}"
                f"; per volume: {sorted((n, dict(l), v) for (n, l), v in samples.items() if 'volume' in dict(l))}"
                + (f"\nplugin log: {instance.log_tail()}" if instance is not None else ""))
        time.sleep(0.5)


def cli(instance: PluginProcess, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main([*argv, "--socket", str(instance.socket)], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def docker_call(instance: PluginProcess, endpoint: str, body: dict) -> tuple[int, dict]:
    """A call as dockerd makes it: no Content-Type, a trailing newline."""
    status, raw = instance.raw(f"/{endpoint}", (json.dumps(body) + "\n").encode())
    return status, json.loads(raw)


def _instance(base: Path, backend: str, label: str, env: dict[str, str]) -> PluginProcess:
    if backend == "zfs":
        pool = make_pool(base, size=256 << 20)
        env = {**env, "SNAPVOL_BACKEND": "zfs", "SNAPVOL_ZFS_ROOT": f"{pool}/snapvol"}
    else:
        pool = None
        env = {**env, "SNAPVOL_POOL_SIZE": "256M"}
    process = PluginProcess(label, base / f"{label}-state", env)
    process.pool = pool  # type: ignore[attr-defined]
    return process


def _stop(process: PluginProcess) -> None:
    """Remove the volumes through the plugin (zfs-fuse calls a pool with mounted datasets
    busy), stop it, and remove its pool."""
    try:
        status, reply = docker_call(process, "VolumeDriver.List", {})
        for volume in reply.get("Volumes", []) if status == 200 else ():
            docker_call(process, "VolumeDriver.Remove", {"Name": volume["Name"]})
    except OSError:
        pass                            # not answering: the pool goes with -f anyway
    process.stop()
    pool = process.pool  # type: ignore[attr-defined]
    if pool is not None:
        # zfs-fuse, busy with other tests, may still hold a dataset of ours mounted
        datasets = subprocess.run(["zfs", "list", "-H", "-o", "name", "-r", pool],
                                  capture_output=True, text=True, timeout=60).stdout.split()
        for dataset in reversed(datasets):
            subprocess.run(["zfs", "unmount", "-f", dataset], capture_output=True, timeout=60)
        try:
            destroy_pool(pool)
        except AssertionError:
            time.sleep(10)
            destroy_pool(pool)
    embedded = process.state_dir / "pool"
    if mounts_under(embedded):
        subprocess.run(["umount", str(embedded)], check=True, timeout=60)


@pytest.fixture(scope="module", params=LANE.host_backends)
def monitored(request, e2e_base: Path) -> Iterator[SimpleNamespace]:
    """A source instance with metrics on a small pool (256 MB) and its replication target;
    Docker unreachable for the source, so that quiesced snapshots fail for real."""
    backend = request.param
    need("mkfs.btrfs")
    if backend == "zfs":
        request.getfixturevalue("zfs_service")
    port = free_port()
    started = []
    try:
        target = _instance(e2e_base, backend, f"svmont{secrets.token_hex(3)}", {})
        target.start()
        started.append(target)
        source = _instance(e2e_base, backend, f"svmons{secrets.token_hex(3)}",
                           {"SNAPVOL_METRICS": f"127.0.0.1:{port}", "SNAPVOL_DOCKER_HOST": NO_DOCKER})
        source.start()
        started.append(source)
        yield SimpleNamespace(source=source, target=target, port=port, backend=backend,
                              target_label=f"unix://{target.socket}")
    finally:
        try:
            if started:
                _stop(started[-1])
        finally:
            if len(started) == 2:       # the target, even when the source's teardown failed
                _stop(started[0])


def test_metrics_are_served_over_tcp_not_on_the_plugin_socket(monitored):
    samples = scrape(monitored.port)
    assert value(samples, "snapvol_info", version=__import__("plugin").__version__,
                 backend=monitored.backend) == 1
    assert value(samples, "snapvol_storage_up") == 1
    status, _ = monitored.source.raw("/metrics", b"", method="GET")
    assert status in (404, 405)        # the Docker socket serves the plugin protocol only
    assert "metrics: serving /metrics on 127.0.0.1" in monitored.source.log_tail(20000)


def test_docker_calls_are_timed_and_errors_counted_per_endpoint(monitored):
    port, source = monitored.port, monitored.source
    before = scrape(port)
    created = value(before, "snapvol_request_duration_seconds_count",
                    endpoint="VolumeDriver.Create") or 0
    missing = value(before, "snapvol_request_errors_total", endpoint="VolumeDriver.Get",
                    code="4xx") or 0
    assert docker_call(source, "VolumeDriver.Create", {"Name": unique("timed"), "Opts": None})[0] == 200
    assert docker_call(source, "VolumeDriver.Get", {"Name": unique("nosuch")})[0] == 404
    after = scrape(port)
    assert value(after, "snapvol_request_duration_seconds_count",
                 endpoint="VolumeDriver.Create") == created + 1
    assert value(after, "snapvol_request_duration_seconds_bucket", endpoint="VolumeDriver.Create",
                 le="+Inf") == created + 1
    assert value(after, "snapvol_request_duration_seconds_sum", endpoint="VolumeDriver.Create") > 0
    assert value(after, "snapvol_request_errors_total", endpoint="VolumeDriver.Get",
                 code="4xx") == missing + 1


def test_a_snapshot_changes_the_count_and_the_newest_time(monitored):
    port, source = monitored.port, monitored.source
    volume = unique("snapped")
    assert docker_call(source, "VolumeDriver.Create", {"Name": volume, "Opts": {}})[0] == 200
    until(port, lambda s: value(s, "snapvol_volume_snapshots", volume=volume) == 0, instance=source)
    assert value(scrape(port), "snapvol_volume_newest_snapshot_timestamp_seconds", volume=volume) is None
    taken = time.time()
    assert cli(source, "snapshot", "create", volume, "--name", "one")[0] == 0
    first = until(port, lambda s: value(s, "snapvol_volume_snapshots", volume=volume) == 1, instance=source)
    newest = value(first, "snapvol_volume_newest_snapshot_timestamp_seconds", volume=volume)
    assert newest is not None and taken - 2 <= newest <= time.time() + 1
    time.sleep(1.1)                     # creation times have a resolution of a second
    assert cli(source, "snapshot", "create", volume, "--name", "two")[0] == 0
    second = until(port, lambda s: value(s, "snapvol_volume_snapshots", volume=volume) == 2, instance=source)
    assert value(second, "snapvol_volume_newest_snapshot_timestamp_seconds", volume=volume) > newest


def test_written_data_shows_in_used_bytes_and_pool_fill(monitored):
    port, source = monitored.port, monitored.source
    volume = unique("used")
    assert docker_call(source, "VolumeDriver.Create", {"Name": volume, "Opts": {}})[0] == 200
    before = until(port, lambda s: value(s, "snapvol_volume_used_bytes", volume=volume) is not None,
                   instance=source)
    available = value(before, "snapvol_pool_available_bytes")
    assert 0 < available < value(before, "snapvol_pool_size_bytes") <= 256 << 20
    status, reply = docker_call(source, "VolumeDriver.Mount", {"Name": volume, "ID": "m1"})
    assert status == 200, reply
    with open(Path(reply["Mountpoint"]) / "data", "wb") as f:
        for _ in range(24):
            f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())
    os.sync()
    after = until(port, lambda s: (value(s, "snapvol_volume_used_bytes", volume=volume) or 0)
                  >= 20 << 20, timeout=60, instance=source)
    assert value(after, "snapvol_pool_available_bytes") < available - (16 << 20)
    assert docker_call(source, "VolumeDriver.Unmount", {"Name": volume, "ID": "m1"})[0] == 200


def test_replications_report_success_bytes_lag_and_failures(monitored):
    port, source, label = monitored.port, monitored.source, monitored.target_label
    volume = unique("repl")
    assert docker_call(source, "VolumeDriver.Create", {"Name": volume, "Opts": {}})[0] == 200
    started = time.time()
    code, out, err = cli(source, "replicate", volume, label)
    assert code == 0, err
    ok = until(port, lambda s: value(s, "snapvol_replication_last_success_timestamp_seconds",
                                     volume=volume, target=label) is not None, instance=source)
    assert started - 1 <= value(ok, "snapvol_replication_last_success_timestamp_seconds",
                                volume=volume, target=label) <= time.time() + 1
    sent = value(ok, "snapvol_replication_last_bytes", volume=volume, target=label)
    assert sent > 0 and f"{int(sent)} bytes" in out          # what the CLI reported
    assert value(ok, "snapvol_replication_sent_bytes_total", volume=volume, target=label) == sent
    assert 0 <= value(ok, "snapvol_replication_lag_seconds", volume=volume, target=label) < 60
    assert value(ok, "snapvol_replication_last_failed", volume=volume, target=label) == 0

    # a target that is not there: retried, then failed; counted once, by kind
    failures = value(ok, "snapvol_failures_total", kind="replication")
    gone = f"unix:///run/docker/plugins/{unique('svgone')}.sock"
    code, _, err = cli(source, "replicate", volume, gone)
    assert code != 0 and "failed after 3 attempt(s)" in err, err
    bad = until(port, lambda s: value(s, "snapvol_replication_last_failed", volume=volume,
                                      target=gone) == 1, instance=source)
    assert value(bad, "snapvol_failures_total", kind="replication") == failures + 1
    assert value(bad, "snapvol_replication_last_success_timestamp_seconds", volume=volume,
                 target=gone) is None
    # the good target's record is untouched by the bad one's failure
    assert value(bad, "snapvol_replication_last_failed", volume=volume, target=label) == 0


def test_the_dashboard_and_alert_rules_query_only_exported_metrics(monitored):
    """Against a scrape that has every kind of series: a scheduled volume with a replicate=
    target, a replication done, an error answered, the scheduler running."""
    port, source, label = monitored.port, monitored.source, monitored.target_label
    volume = unique("named")
    opts = {"schedule": "1h", "replicate": label}
    assert docker_call(source, "VolumeDriver.Create", {"Name": volume, "Opts": opts})[0] == 200
    assert cli(source, "replicate", volume, label)[0] == 0
    assert docker_call(source, "VolumeDriver.Get", {"Name": unique("nosuch")})[0] == 404
    samples = until(port, lambda s: value(s, "snapvol_replication_interval_seconds",
                                          volume=volume, target=label, kind="replicate") == 3600, instance=source)
    assert value(samples, "snapvol_volume_schedule_interval_seconds", volume=volume) == 3600
    exported = {name for name, _ in samples}
    # A validated restore that passes needs a dockerd to run its check, and this source has
    # none on purpose: the verify series are checked in the unit tier's registry
    # (test_metrics_app.py) and their facts through a real plugin in test_verify.py.
    assert referenced_metrics() - exported - VERIFY_SERIES == set()
    # and the README's table documents every series the plugin exports
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Metrics and monitoring")[1].split("\n## ")[0]
    series = {re.sub(r"_(bucket|count|sum|created)$", "", name) for name in exported}
    assert {name for name in series if f"`{name}" not in section} == set()


def test_check_freshness_ok_then_warn_on_a_late_schedule_then_crit_on_a_full_pool(monitored):
    """WARN: a schedule=30s volume whose automatic snapshot fails (quiesce=pause with Docker
    unreachable), 45 s (1.5 intervals) after its creation. CRIT: the 256 MB pool written full."""
    need("mkfs.btrfs")
    port, source = monitored.port, monitored.source
    late = unique("late")
    before = scrape(port)
    failures = value(before, "snapvol_failures_total", kind="automatic_snapshot")
    runs = value(before, "snapvol_scheduler_lateness_seconds_count")
    opts = {"schedule": "30s", "quiesce": "pause"}
    assert docker_call(source, "VolumeDriver.Create", {"Name": late, "Opts": opts})[0] == 200
    created = time.monotonic()
    code, out, _ = cli(source, "check", "--freshness")
    assert (code, out.split(":")[0]) == (0, "OK"), out
    # the consistency check is unchanged beside it
    assert cli(source, "check")[:2] == (0, "consistent: nothing left over, nothing stale\n")

    # the first automatic run, 30 s after creation, fails for real; the metrics count it
    ran = until(port, lambda s: value(s, "snapvol_failures_total", kind="automatic_snapshot")
                == failures + 1, timeout=60, instance=source)
    assert value(ran, "snapvol_scheduler_lateness_seconds_count") == runs + 1
    assert value(ran, "snapvol_volume_snapshots", volume=late) == 0
    assert value(ran, "snapvol_volume_newest_snapshot_timestamp_seconds", volume=late) is None
    assert abs(value(ran, "snapvol_volume_created_timestamp_seconds", volume=late)
               - (time.time() - (time.monotonic() - created))) < 3
    time.sleep(max(0.0, created + 47 - time.monotonic()))
    code, out, _ = cli(source, "check", "--freshness")
    assert code == 1, out
    assert out.splitlines() == [line for line in out.splitlines() if line.startswith("WARN")]
    assert f"WARN snapshot age: volume {late}: no snapshot yet, created" in out

    filler = unique("filler")
    assert docker_call(source, "VolumeDriver.Create", {"Name": filler, "Opts": {}})[0] == 200
    status, reply = docker_call(source, "VolumeDriver.Mount", {"Name": filler, "ID": "f1"})
    assert status == 200, reply
    write_until_refused(Path(reply["Mountpoint"]) / "fill", 400)
    os.sync()
    deadline = time.monotonic() + 60
    while True:                         # the pool's accounting follows at its next commit
        code, out, _ = cli(source, "check", "--freshness")
        if code == 2 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert code == 2, out
    assert out.splitlines()[0].startswith("CRIT pool: "), out
    assert f"WARN snapshot age: volume {late}" in out
    code, out, _ = cli(source, "check", "--freshness", "--json")
    assert code == 2 and json.loads(out)["Status"] == "CRIT"
    docker_call(source, "VolumeDriver.Unmount", {"Name": filler, "ID": "f1"})
    assert docker_call(source, "VolumeDriver.Remove", {"Name": filler})[0] == 200
