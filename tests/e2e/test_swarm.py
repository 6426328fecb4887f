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
import time
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
    """Nodes a (manager) and b (worker), with the test images loaded (they have no registry)."""
    need("sshd", "ssh", "ssh-keygen", "nsenter", "unshare", "ip", "losetup", "mkfs.btrfs")
    base = Path(tempfile.mkdtemp(prefix="snapvol-swarm-", dir="/tmp"))
    nodes = TwoNodes(base)
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


def service_create(node: Node, name: str, volume: str, target: str, image: str, *command: str,
                   env: tuple[str, ...] = ()) -> None:
    node.docker("service", "create", "--detach", "--no-resolve-image", "--name", name,
                "--endpoint-mode", "dnsrr", "--restart-condition", "any", "--stop-grace-period", "2s",
                "--constraint", "node.hostname==node-a",
                "--mount", f"type=volume,source={volume},target={target},volume-driver=snapvol",
                *[a for e in env for a in ("--env", e)], image, *command)


def wait_running(nodes: TwoNodes, service: str, timeout: float = 120) -> tuple[Node, str]:
    """The node and container id of *service*'s running task (its one replica)."""
    deadline = time.monotonic() + timeout
    while True:
        tasks = nodes.a.docker("service", "ps", "--no-trunc", "--format", "{{json .}}", service)
        for task in map(json.loads, tasks.splitlines()):
            if task["CurrentState"].startswith("Running"):
                node = next(n for n in nodes if n.hostname == task["Node"])
                ids = node.docker("ps", "-q", "--filter",
                                  f"label=com.docker.swarm.task.id={task['ID']}").split()
                if ids:
                    return node, ids[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"{service} not running after {timeout} s:\n{tasks}\n"
                                 + nodes.a.docker("service", "ps", "--no-trunc", service, check=False))
        time.sleep(0.5)


def remove_service(nodes: TwoNodes, service: str, volume: str) -> None:
    """Remove the service, wait for its container to go, then its volume on node a."""
    nodes.a.docker("service", "rm", service, check=False)
    deadline = time.monotonic() + 60
    label = f"label=com.docker.swarm.service.name={service}"
    while nodes.a.docker("ps", "-aq", "--filter", label).split():
        assert time.monotonic() < deadline, f"{service}'s container is still there after 60 s"
        time.sleep(0.5)
    nodes.a.docker("volume", "rm", volume)


def test_a_swarm_service_writes_into_a_snapvol_volume_on_its_node(request, two_nodes: TwoNodes,
                                                                   busybox: str):
    nodes = two_nodes
    service, volume = unique("swarm-bb"), unique("swarmvol")
    started = time.monotonic()
    service_create(nodes.a, service, volume, "/data", busybox,
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
    service_create(nodes.a, service, volume, PGDATA, postgres_image, env=("POSTGRES_PASSWORD=test",))
    node, container = wait_running(nodes, service)
    try:
        assert node is nodes.a
        deadline = time.monotonic() + 120
        while True:
            ready = nodes.a.docker.result("exec", container, "psql", "-U", "postgres", "-qAt",
                                          "-c", "SELECT 1")
            if ready.returncode == 0 and ready.stdout.strip() == "1":
                break
            if time.monotonic() > deadline:
                logs = nodes.a.docker("logs", container, check=False)[-2000:]
                raise AssertionError(f"postgres not ready: {ready.stderr}\n{logs}")
            time.sleep(0.5)
        report(request, f"postgres service ready: {time.monotonic() - started:.1f} s")
        mountpoint = json.loads(nodes.a.docker("volume", "inspect", volume))[0]["Mountpoint"]
        assert (nodes.a.path(mountpoint) / "PG_VERSION").read_text().strip() == "15"
        assert volume not in nodes.b.docker("volume", "ls", "-q").split()
    finally:
        remove_service(nodes, service, volume)
