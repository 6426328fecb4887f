"""`scripts/run`, the README's main command, as a user runs it: start, again, use, stop, start.

It runs against the tests' private dockerd (DOCKER_HOST), so it starts no engine of its own,
and with its own driver name, state and run directories. It is left running until the end of
the session: dockerd stalls 15 s on every `docker volume ls` once a legacy driver it has used
is gone, so it is stopped only when no more Docker calls follow.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import REPO, mounts_under, unique


class ScriptsRun:
    def __init__(self, docker, base: Path) -> None:
        self.driver = f"snapvolrun{secrets.token_hex(3)}"
        self.state = base / "runstate"
        self.env = {**os.environ, "DOCKER_HOST": docker.env["DOCKER_HOST"],
                    "SNAPVOL_SOCKET": f"/run/docker/plugins/{self.driver}.sock",
                    "SNAPVOL_STATE_DIR": str(self.state),
                    "SNAPVOL_RUN_DIR": f"/run/snapvol/{self.driver}", "SNAPVOL_POOL_SIZE": "1G"}

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(REPO / "scripts" / "run"), *args], env=self.env,
                              capture_output=True, text=True, timeout=600)


CLI_LINK = Path("/usr/local/bin/snapvol")      # scripts/run links the CLI here


@pytest.fixture(scope="session")
def scripts_run(docker, e2e_base: Path) -> Iterator[ScriptsRun]:
    """scripts/run's instance; afterwards the CLI link is as it was before (a link into this
    checkout must not outlive a run of the tests from a temporary clone)."""
    before = os.readlink(CLI_LINK) if CLI_LINK.is_symlink() else None
    run = ScriptsRun(docker, e2e_base)
    yield run
    run("stop")
    if before is None and CLI_LINK.is_symlink():
        CLI_LINK.unlink()
    elif before is not None and not (CLI_LINK.is_symlink() and os.readlink(CLI_LINK) == before):
        CLI_LINK.unlink(missing_ok=True)
        CLI_LINK.symlink_to(before)
    for point in mounts_under(run.state):
        subprocess.run(["umount", point], check=False)
    shutil.rmtree(run.env["SNAPVOL_RUN_DIR"], ignore_errors=True)


def test_start_again_use_stop_start(docker, busybox, scripts_run):
    first = scripts_run()
    assert first.returncode == 0, first.stderr
    assert "snapvol is up" in first.stdout
    assert f"docker volume create -d {scripts_run.driver}" in first.stdout
    again = scripts_run()
    assert again.returncode == 0 and "already up" in again.stderr

    name = unique("viarun")
    docker("volume", "create", "-d", scripts_run.driver, "-o", "size=32M", name)
    docker("run", "--rm", "--network", "none", "-v", f"{name}:/data", busybox,
           "sh", "-c", "echo written > /data/f")
    status = scripts_run("status")
    assert status.returncode == 0 and "up (pid" in status.stderr

    stop = scripts_run("stop")
    assert stop.returncode == 0 and "stopping the plugin" in stop.stderr
    assert scripts_run("status").returncode == 3
    restarted = scripts_run()           # the same pool again, never reformatted
    assert restarted.returncode == 0, restarted.stderr
    assert docker("run", "--rm", "--network", "none", "-v", f"{name}:/data", busybox,
                  "cat", "/data/f").strip() == "written"
    assert (scripts_run.state / "snapvol.log").stat().st_size > 0
    docker("volume", "rm", name)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(") ")[2].split()[0]
    except OSError:
        return "gone"


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_a_killed_plugin_is_dead_to_status_and_start_at_once(scripts_run):
    """kill -9 of the plugin leaves a zombie until its parent reaps it, and a zombie answers
    `kill -0`: `status` must say "not running" and `start` must start it, not "already up".

    The test makes the zombie stay: it is the plugin's subreaper (orphans are given to it,
    not to init) and reaps the killed processes only at the end."""
    import ctypes
    import signal
    import time

    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_CHILD_SUBREAPER = 36
    assert scripts_run("stop").returncode == 0
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    adopted: list[int] = []
    try:
        assert scripts_run().returncode == 0            # its master is now our child
        master = int((scripts_run.state / "snapvol.pid").read_text())
        adopted = [master, *_children(master)]
        os.kill(master, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _state(master) != "Z":
            assert time.monotonic() < deadline, _state(master)
            time.sleep(0.05)
        os.kill(master, 0)                              # the zombie answers kill -0
        status = scripts_run("status")
        assert status.returncode == 3 and "not running" in status.stderr, status.stderr
        restarted = scripts_run()
        assert restarted.returncode == 0 and "snapvol is up" in restarted.stdout, (
            restarted.stderr + (scripts_run.state / "snapvol.log").read_text()[-3000:])
        assert "already up" not in restarted.stderr
        adopted.append(int((scripts_run.state / "snapvol.pid").read_text()))
        assert scripts_run("stop").returncode == 0
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        deadline = time.monotonic() + 30
        for pid in adopted:                             # reap ours, and only ours
            while time.monotonic() < deadline:
                try:
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        break
                except ChildProcessError:
                    break
                time.sleep(0.1)
    assert scripts_run().returncode == 0                # up again for the session
