"""A crash of the plugin while a container writes: nothing is lost, mount IDs survive."""

from __future__ import annotations

import signal
import time

from tests.e2e.harness import inspect_volume, unique


def lines(docker, container: str) -> int:
    return int(docker("exec", container, "sh", "-c", "wc -l < /data/log").strip())


def test_sigkill_and_restart_with_a_writing_container(docker, host_plugin, busybox):
    plugin = host_plugin
    name, writer = unique("restart"), unique("writer")
    docker("volume", "create", "-d", plugin.driver, name)
    docker("run", "-d", "--name", writer, "--network", "none", "-v", f"{name}:/data", busybox,
           "sh", "-c", "i=0; while true; do i=$((i+1)); echo $i >> /data/log; sleep 0.05; done")
    deadline = time.monotonic() + 30
    while lines(docker, writer) < 5:
        assert time.monotonic() < deadline, "the writer never started"
        time.sleep(0.1)

    old_pid = plugin.pid
    plugin.kill(signal.SIGKILL)
    before = lines(docker, writer)
    time.sleep(0.5)
    assert lines(docker, writer) > before, "the container stopped writing while the plugin was down"
    assert plugin.socket.exists()        # stale: nobody listens; the new start replaces it
    plugin.start()                       # waits for the old worker to release the state lock
    assert plugin.pid != old_pid

    before = lines(docker, writer)
    time.sleep(0.5)
    assert lines(docker, writer) > before
    assert name in docker("volume", "ls", "--format", "{{.Name}}").split()
    assert inspect_volume(docker, name)["Status"]["mounts"] == 1     # persisted mount ID

    docker("rm", "-f", writer)           # delivers the old mount ID's Unmount to the new process
    assert inspect_volume(docker, name)["Status"]["mounts"] == 0
    log = docker("run", "--rm", "--network", "none", "-v", f"{name}:/data", busybox,
                 "cat", "/data/log").split()
    assert log == [str(i) for i in range(1, len(log) + 1)]           # nothing lost or torn
    docker("volume", "rm", name)
    assert name not in docker("volume", "ls", "--format", "{{.Name}}").split()
