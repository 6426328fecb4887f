"""Two Docker nodes in a Swarm, each with its own snapvol (tests/e2e/nodes.py): the ground the
standby-replica tests stand on. These smoke tests prove the ground itself: a Swarm service
lands on node a with a snapvol volume there (and nowhere else), each node's snapvol answers the
other over ssh the way replication reaches it, and a real database runs as a Swarm service on
a snapvol volume.

Only the host lane collects this module (tests/e2e/conftest.py: the openzfs lane has no Btrfs
host plugin).
"""

from __future__ import annotations

import json
import shlex
import tempfile
import threading
import time
from datetime import datetime
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need
from tests.e2e.harness import build_test_image, unique
from tests.e2e.nodes import SNAPVOL_CLI, SOCKET, Node, TwoNodes

HERE = Path(__file__).resolve().parent
PGDATA = "/var/lib/postgresql/data"


def report(request: pytest.FixtureRequest, line: str) -> None:
    """Write *line* to the terminal now, captured output or not (the timings)."""
    plugins = request.config.pluginmanager
    reporter, capture = plugins.getplugin("terminalreporter"), plugins.getplugin("capturemanager")
    if reporter is None or capture is None:
        print(f"[swarm] {line}")
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"[swarm] {line}")


@pytest.fixture(scope="module")
def postgres_image(docker) -> str:
    return build_test_image(docker, "snapvol-test/postgres:15", HERE / "images" / "postgres")


@pytest.fixture(scope="module")
def two_nodes(request, docker, busybox: str, postgres_image: str) -> Iterator[TwoNodes]:
    """Nodes a (worker) and b (Swarm manager), with the test images loaded (they have no
    registry). b manages so that the failover test can kill node a and still have a Swarm."""
    need("sshd", "ssh", "ssh-keygen", "nsenter", "unshare", "ip", "losetup", "mkfs.btrfs")
    base = Path(tempfile.mkdtemp(prefix="snapvol-swarm-", dir="/tmp"))
    nodes = TwoNodes(base, manager="b")
    try:
        nodes.up()
        t = nodes.timings
        report(request, f"up: {t['up']:.1f} s (nodes {t['nodes']:.1f} s, swarm {t['swarm']:.1f} s); "
                        f"snapvol known to the scheduler {t['plugin_known']:.1f} s later")
        started = time.monotonic()
        nodes.load_images(docker.env, busybox, postgres_image)
        report(request, f"images loaded into both nodes: {time.monotonic() - started:.1f} s")
        yield nodes
    finally:
        nodes.down()
        if "down" in nodes.timings:
            report(request, f"down: {nodes.timings['down']:.1f} s")


def service_create(nodes: TwoNodes, name: str, volume: str, target: str, image: str,
                   *command: str, env: tuple[str, ...] = (), on: str | None = "node-a",
                   volume_opts: tuple[str, ...] = (), options: tuple[str, ...] = ()) -> None:
    """One replica of *image* with a snapvol volume; *on*: a node.hostname constraint."""
    mount = ",".join([f"type=volume,source={volume},target={target},volume-driver=snapvol",
                      *[f"volume-opt={o}" for o in volume_opts]])
    nodes.manager.docker(
        "service", "create", "--detach", "--no-resolve-image", "--name", name,
        "--endpoint-mode", "dnsrr", "--restart-condition", "any", "--stop-grace-period", "2s",
        *(["--constraint", f"node.hostname=={on}"] if on else []), *options,
        "--mount", mount, *[a for e in env for a in ("--env", e)], image, *command)


def wait_running(nodes: TwoNodes, service: str, timeout: float = 120,
                 on: Node | None = None) -> tuple[Node, str]:
    """The node and container id of *service*'s running task (its one replica; the one on
    node *on*, when given: while a task moves, the old one may still read Running)."""
    deadline = time.monotonic() + timeout
    while True:
        tasks = nodes.manager.docker("service", "ps", "--no-trunc", "--format", "{{json .}}",
                                     service)
        for task in map(json.loads, tasks.splitlines()):
            if task["CurrentState"].startswith("Running") and task["DesiredState"] == "Running":
                node = next(n for n in nodes if n.hostname == task["Node"])
                if on is not None and node is not on:
                    continue
                ids = node.docker("ps", "-q", "--filter",
                                  f"label=com.docker.swarm.task.id={task['ID']}").split()
                if ids:
                    return node, ids[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"{service} not running after {timeout} s:\n{tasks}\n"
                                 + nodes.manager.docker("service", "ps", "--no-trunc", service,
                                                        check=False))
        time.sleep(0.5)


def psql(node: Node, container: str, sql: str, timeout: float = 30):
    """Run *sql* in *container* on *node* (the completed process: a failure is an answer)."""
    return node.docker.result("exec", container, "psql", "-U", "postgres", "-qAt",
                              "-v", "ON_ERROR_STOP=1", "-c", sql, timeout=timeout)


def wait_postgres(node: Node, container: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        ready = psql(node, container, "SELECT 1")
        if ready.returncode == 0 and ready.stdout.strip() == "1":
            return
        if time.monotonic() > deadline:
            logs = node.docker("logs", container, check=False)[-2000:]
            raise AssertionError(f"postgres not ready: {ready.stderr}\n{logs}")
        time.sleep(0.5)


def remove_service(nodes: TwoNodes, service: str, volume: str) -> None:
    """Remove the service, wait for its containers to go, then its volume on every node
    whose dockerd runs (and has it)."""
    nodes.manager.docker("service", "rm", service, check=False)
    deadline = time.monotonic() + 60
    label = f"label=com.docker.swarm.service.name={service}"
    running = [n for n in nodes if n.dockerd is not None and n.dockerd.alive()]
    while any(n.docker("ps", "-aq", "--filter", label).split() for n in running):
        assert time.monotonic() < deadline, f"{service}'s container is still there after 60 s"
        time.sleep(0.5)
    for node in running:
        if volume in node.docker("volume", "ls", "-q").split():
            node.docker("volume", "rm", volume)


def volume_drivers(node: Node) -> list[str]:
    """What ``docker info`` on *node* lists under Plugins.Volume (it looks nothing up)."""
    return json.loads(node.docker("info", "--format", "{{json .Plugins.Volume}}")) or []


def test_a_restarted_node_learns_the_snapvol_driver_with_no_command_typed(request,
                                                                          two_nodes: TwoNodes):
    """A dockerd that starts with no snapvol volume never looks the driver up by itself, and
    its Swarm description would lack it: tasks with volume-driver=snapvol would stay Pending
    ("missing plugin"). snapvol's announcer (plugin/announce.py) notices and makes dockerd
    look it up; the manager knows the driver again within the agent's 20 s tick."""
    nodes = two_nodes
    node = nodes.worker
    node.stop_dockerd()
    node.start_dockerd(lookup=False)              # nothing of ours looks the driver up
    started = time.monotonic()
    before = volume_drivers(node)
    deadline = time.monotonic() + 30
    while "snapvol" not in volume_drivers(node):
        assert time.monotonic() < deadline, "dockerd never learnt the snapvol driver"
        time.sleep(0.5)
    listed = time.monotonic() - started
    nodes.wait_plugin_known(timeout=60)
    report(request, f"dockerd restarted (lists snapvol at first: {'snapvol' in before}); lists it "
                    f"{listed:.1f} s later, the Swarm manager {time.monotonic() - started:.1f} s later")


def test_a_swarm_service_writes_into_a_snapvol_volume_on_its_node(request, two_nodes: TwoNodes,
                                                                   busybox: str):
    nodes = two_nodes
    service, volume = unique("swarm-bb"), unique("swarmvol")
    started = time.monotonic()
    service_create(nodes, service, volume, "/data", busybox,
                   "sh", "-c", f"echo {volume} > /data/hello && sleep 3600")
    node, container = wait_running(nodes, service)
    report(request, f"busybox service running: {time.monotonic() - started:.1f} s")
    try:
        assert node is nodes.a
        deadline = time.monotonic() + 30           # the task runs: its write may lag a little
        while nodes.a.docker("exec", container, "cat", "/data/hello", check=False).strip() != volume:
            assert time.monotonic() < deadline, "the task did not write /data/hello"
            time.sleep(0.2)
        # node a's snapvol has the volume, and its file is on node a's pool
        code, out, err = nodes.a.snapvol_cli("ls", "--json")
        assert code == 0, err
        listed = {v["name"]: v for v in json.loads(out)["Volumes"]}
        assert volume in listed and listed[volume]["mounts"] == 1, listed
        mountpoint = json.loads(nodes.a.docker("volume", "inspect", volume))[0]["Mountpoint"]
        assert mountpoint.startswith(str(nodes.a.dir / "state") + "/"), mountpoint
        assert (nodes.a.path(mountpoint) / "hello").read_text().strip() == volume
        assert not (Path(mountpoint) / "hello").exists()     # the pool is node a's alone
        # node b has no such volume, neither in its dockerd nor in its snapvol
        assert volume not in nodes.b.docker("volume", "ls", "-q").split()
        code, out, err = nodes.b.snapvol_cli("ls", "--json")
        assert code == 0, err
        assert volume not in [v["name"] for v in json.loads(out)["Volumes"]]
    finally:
        remove_service(nodes, service, volume)


@pytest.mark.parametrize("src,dst", [("a", "b"), ("b", "a")])
def test_each_snapvol_answers_the_other_over_ssh(two_nodes: TwoNodes, src: str, dst: str):
    """The path replication takes: ssh from inside one node, with the plugin's key and
    known_hosts, runs snapvol on the other node against that node's socket."""
    source, target = two_nodes.nodes[src], two_nodes.nodes[dst]
    env = source.snapvol_env()
    ssh = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
           "-o", f"UserKnownHostsFile={env['SNAPVOL_SSH_KNOWN_HOSTS']}",
           "-i", env["SNAPVOL_SSH_KEY"], "-o", "IdentitiesOnly=yes", "--", f"root@{target.ip}",
           shlex.join([env["SNAPVOL_REMOTE_SNAPVOL"], "--socket", SOCKET, "status", "--json"])]
    assert env["SNAPVOL_REMOTE_SNAPVOL"] == str(SNAPVOL_CLI)
    assert env["SNAPVOL_ADVERTISE"] == f"ssh://root@{source.ip}{SOCKET}"
    answer = source.run(*ssh, timeout=60)
    assert answer.returncode == 0, answer.stderr
    status = json.loads(answer.stdout)["Status"]
    assert status["storage"]["root"] == str(target.dir / "state" / "pool")   # the other node's
    code, out, err = target.snapvol_cli("status", "--json")
    assert code == 0, err
    assert json.loads(out)["Status"]["storage"] == status["storage"]
    # and nothing else gets in: an unknown host key is refused
    stranger = source.run("ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                          "-o", "UserKnownHostsFile=/dev/null", "-i", env["SNAPVOL_SSH_KEY"],
                          f"root@{target.ip}", "true", timeout=60)
    assert stranger.returncode != 0


def test_postgres_runs_as_a_swarm_service_on_a_snapvol_volume(request, two_nodes: TwoNodes,
                                                              postgres_image: str):
    nodes = two_nodes
    service, volume = unique("swarm-pg"), unique("swarmpg")
    started = time.monotonic()
    service_create(nodes, service, volume, PGDATA, postgres_image, env=("POSTGRES_PASSWORD=test",))
    node, container = wait_running(nodes, service)
    try:
        assert node is nodes.a
        wait_postgres(nodes.a, container)
        report(request, f"postgres service ready: {time.monotonic() - started:.1f} s")
        mountpoint = json.loads(nodes.a.docker("volume", "inspect", volume))[0]["Mountpoint"]
        assert (nodes.a.path(mountpoint) / "PG_VERSION").read_text().strip() == "15"
        assert volume not in nodes.b.docker("volume", "ls", "-q").split()
    finally:
        remove_service(nodes, service, volume)


class Writer(threading.Thread):
    """Commits one row per psql call (``INSERT ... RETURNING``) into the service's current
    container, wherever :attr:`where` says it is, and remembers every row PostgreSQL
    acknowledged, with the wall-clock time of the acknowledgement. A call that fails (the
    container stopping, moving) is retried with the next number; bounded by *limit* seconds."""

    def __init__(self, limit: float = 600) -> None:
        super().__init__(daemon=True, name="pg-writer")
        self.where: tuple[Node, str] | None = None
        self.acked: list[tuple[int, float]] = []
        self.failed = 0
        self._halt = threading.Event()
        self._limit = limit

    def run(self) -> None:
        n, deadline = 0, time.monotonic() + self._limit
        while not self._halt.is_set() and time.monotonic() < deadline:
            where = self.where
            if where is None:
                time.sleep(0.2)
                continue
            n += 1
            answer = psql(*where, f"INSERT INTO committed (id) VALUES ({n}) RETURNING id", timeout=20)
            if answer.returncode == 0 and answer.stdout.strip() == str(n):
                self.acked.append((n, time.time()))
            else:
                self.failed += 1
                time.sleep(0.3)

    def stop(self) -> None:
        self._halt.set()
        self.join(60)

    def ids(self, before: float | None = None) -> set[int]:
        return {i for i, at in list(self.acked) if before is None or at < before}

    def wait_rows(self, count: int, timeout: float = 60) -> None:
        """Until *count* more rows are acknowledged."""
        goal, deadline = len(self.acked) + count, time.monotonic() + timeout
        while len(self.acked) < goal:
            assert time.monotonic() < deadline, f"writer stuck ({self.failed} failures)"
            time.sleep(0.2)


def stored_ids(node: Node, container: str) -> set[int]:
    answer = psql(node, container, "SELECT id FROM committed")
    assert answer.returncode == 0, answer.stderr
    return {int(line) for line in answer.stdout.split()}


def availability(nodes: TwoNodes, **states: str) -> None:
    for name, state in states.items():
        nodes.manager.docker("node", "update", "--availability", state, f"node-{name}")


def move(request, nodes: TwoNodes, service: str, writer: Writer, volume: str, to: Node,
         what: str) -> tuple[Node, str]:
    """Drain the node the task runs on (the other one made active first), wait for the task
    on *to* and its PostgreSQL, point the writer there; assert every row acknowledged before
    is there. Reports the time from the drain to PostgreSQL answering on *to*."""
    source = nodes.a if to is nodes.b else nodes.b
    availability(nodes, **{to.name: "active"})
    started = time.monotonic()
    availability(nodes, **{source.name: "drain"})
    node, container = wait_running(nodes, service, timeout=180, on=to)
    wait_postgres(node, container)
    seconds = time.monotonic() - started
    acked = writer.ids()                   # everything acknowledged so far, on the old node
    writer.where = (node, container)
    missing = acked - stored_ids(node, container)
    assert not missing, f"{what}: {len(missing)} committed rows lost: {sorted(missing)[:20]}"
    code, out, err = to.snapvol_cli("role", volume, "--json")
    assert code == 0, err
    role = json.loads(out)
    assert role["Role"] == "primary", role
    report(request, f"{what}: drain of {source.hostname} -> PostgreSQL answering on "
                    f"{to.hostname} with all {len(acked)} committed rows: {seconds:.1f} s "
                    f"(epoch {role['Epoch']})")
    return node, container


def test_a_postgres_service_moves_with_its_data_on_drain_and_fails_over_by_promote(
        request, two_nodes: TwoNodes, postgres_image: str):
    """The issue's proof: PostgreSQL as a Swarm service on a volume with a standby. A drain
    moves the task and the data (planned hand-off, started by the Mount on the other node:
    no command typed), back and forth; then node a dies, Swarm restarts the task on b, where
    the Mount refuses with "promote" until an operator runs ``snapvol promote``; PostgreSQL
    then recovers with every row committed up to the last sync.

    Runs last in this module: it kills node a's dockerd and snapvol."""
    nodes = two_nodes
    a, b = nodes.a, nodes.b
    service, volume = unique("swarm-ha"), unique("pgha")
    opts = (f"standby={b.advertise}", "sync=2s")
    writer = Writer()
    availability(nodes, b="drain")                   # the first task runs on a
    service_create(nodes, service, volume, PGDATA, postgres_image, on=None, volume_opts=opts,
                   env=("POSTGRES_PASSWORD=test",),
                   options=("--stop-signal", "SIGINT", "--stop-grace-period", "30s",
                            "--restart-delay", "1s"))
    try:
        node, container = wait_running(nodes, service)
        assert node is a
        wait_postgres(a, container)
        created = psql(a, container, "CREATE TABLE committed (id int PRIMARY KEY, at timestamptz "
                                     "NOT NULL DEFAULT clock_timestamp())")
        assert created.returncode == 0, created.stderr
        writer.where = (a, container)
        writer.start()
        writer.wait_rows(20)
        # b became a standby by a's syncs: docker volume ls on b shows it
        deadline = time.monotonic() + 30
        while volume not in b.docker("volume", "ls", "-q").split():
            assert time.monotonic() < deadline, "the standby never appeared on node b"
            time.sleep(0.5)
        # 1. planned: drain a -> the task and every committed row move to b
        move(request, nodes, service, writer, volume, b, "hand-off a -> b (drain)")
        writer.wait_rows(20)
        # 2. and back: drain b -> a (replication had reversed: a was b's standby)
        node, container = move(request, nodes, service, writer, volume, a,
                               "hand-off b -> a (drain)")
        availability(nodes, b="active")
        writer.wait_rows(20)
        # wait for a sync from a to b that holds rows written on a since the move back
        written = time.time()
        deadline = time.monotonic() + 30
        while True:
            code, out, err = a.snapvol_cli("role", volume, "--json")
            assert code == 0, err
            [row] = json.loads(out)["Detail"]["standbys"]
            if row["synced_at"] and datetime.fromisoformat(row["synced_at"]).timestamp() > written:
                break
            assert time.monotonic() < deadline, f"no sync to b after the move back: {row}"
            time.sleep(0.5)
        writer.wait_rows(10)
        # 3. failover: node a dies (its snapvol and dockerd, kill -9) while rows go in
        killed = time.time()
        a.crash()
        writer.where = None
        # Swarm sees a down and starts the task on b; b's Mount asks a for a hand-off, a
        # cannot answer, and the Mount says what to do
        deadline = time.monotonic() + 180
        while True:
            tasks = b.docker("service", "ps", "--no-trunc", "--format", "{{.Node}} {{.Error}}",
                             service)
            if any(line.startswith("node-b ") and "snapvol promote" in line
                   for line in tasks.splitlines()):
                break
            assert time.monotonic() < deadline, f"no task on b refused for promote:\n{tasks}"
            time.sleep(1)
        code, out, err = b.snapvol_cli("promote", volume, "--json")
        assert code == 0, out + err
        promoted = json.loads(out)["Promoted"]
        synced_at = datetime.fromisoformat(promoted["created"]).timestamp()
        node, container = wait_running(nodes, service, timeout=180, on=b)
        wait_postgres(b, container, timeout=180)
        stored = stored_ids(b, container)
        committed_before_sync = writer.ids(before=synced_at)
        missing = committed_before_sync - stored
        assert not missing, f"rows committed before the last sync lost: {sorted(missing)[:20]}"
        lost = writer.ids() - stored
        report(request, f"failover: promote on b served {promoted['snapshot']}, "
                        f"{killed - synced_at:.1f} s before the kill (sync=2s); rows committed "
                        f"{len(writer.ids())}, on b {len(stored & writer.ids())}, lost after the "
                        f"last sync {len(lost)}")
    finally:
        writer.stop()
        remove_service(nodes, service, volume)
