"""A crash of the plugin while a container writes: nothing is lost, mount IDs survive."""

from __future__ import annotations

import json
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


def test_damaged_state_files_never_stop_the_plugin(docker, host_plugin, busybox):
    """Truncated or foreign state files (a full disk, a hand edit): the plugin starts, every
    volume keeps working through Docker, each file is moved aside with one error line in the
    log, `snapvol status` names them, and `snapvol check` reports them until they are
    removed."""
    plugin = host_plugin
    name = unique("damaged")
    docker("volume", "create", "-d", plugin.driver, "-o", "schedule=1h", name)
    docker("run", "--rm", "--network", "none", "-v", f"{name}:/data", busybox,
           "sh", "-c", "echo kept > /data/f")
    plugin.kill(signal.SIGKILL)
    damaged = {plugin.state_dir / "schedule.json": b'{"' + name.encode() + b'": {"at": "2026-',
               plugin.state_dir / "replication.json": b"\x00\x00\x00\x00",
               plugin.run_dir / "mounts.json": b"<html>502 Bad Gateway</html>"}
    for path, junk in damaged.items():
        path.write_bytes(junk)
    plugin.start()
    assert docker("run", "--rm", "--network", "none", "-v", f"{name}:/data", busybox,
                  "cat", "/data/f").strip() == "kept"
    assert inspect_volume(docker, name)["Status"]["schedule"]["every"] == "1h"
    status = plugin.call("Snapvol.Status")[1]["Status"]
    code, report = check(plugin)
    assert code == 1 and report.count("damaged state file:") == 3, report
    for path in damaged:
        if path.exists():                   # written anew since: whole and readable
            json.loads(path.read_text())
        assert any(p.startswith(f"{path}.corrupt-") for p in status["damaged_state_files"]), status
        assert f"state file {path} is damaged" in plugin.log_tail(20000)
        assert f"{path}.corrupt-" in report
        for aside in path.parent.glob(f"{path.name}.corrupt-*"):
            aside.unlink()
    assert check(plugin) == (0, "consistent: nothing left over, nothing stale\n")
    docker("volume", "rm", name)


def check(plugin) -> tuple[int, str]:
    """`snapvol check` against *plugin*: exit status and what it printed."""
    import io

    from plugin.cli import main
    out, err = io.StringIO(), io.StringIO()
    code = main(["--socket", str(plugin.socket), "check"], stdout=out, stderr=err, environ={})
    return code, out.getvalue() + err.getvalue()
