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
