"""Compose with `driver: <snapvol>`, driver_opts and an external volume (Compose v1 or v2)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REQUIRE_ALL
from tests.e2e.harness import inspect_volume, unique

COMPOSE_FILE = """\
version: "3.7"
services:
  app:
    image: {image}
    network_mode: none
    command: sh -c 'echo from-compose > /data/made && cat /ext/marker > /data/copied'
    volumes: ["data:/data", "ext:/ext"]
volumes:
  data:
    driver: {driver}
    driver_opts: {{size: "64M", mode: "0750"}}
  ext:
    external: true
    name: {external}
"""


def compose_command(docker) -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if docker.result("compose", "version").returncode == 0:
        return ["docker", "compose"]
    message = "needs docker-compose or the docker compose plugin"
    if REQUIRE_ALL:
        pytest.fail(message)
    pytest.skip(message)


def test_compose_project_and_external_volume(docker, driver, busybox, tmp_path: Path):
    external = unique("ext")
    docker("volume", "create", "-d", driver.driver, external)
    docker("run", "--rm", "--network", "none", "-v", f"{external}:/ext", busybox,
           "sh", "-c", "echo outside > /ext/marker")
    (tmp_path / "docker-compose.yml").write_text(
        COMPOSE_FILE.format(image=busybox, driver=driver.driver, external=external))
    project = unique("proj").replace("-", "")
    compose = [*compose_command(docker), "-p", project, "-f", str(tmp_path / "docker-compose.yml")]

    def run(*args: str) -> str:
        proc = subprocess.run([*compose, *args], env=docker.env, capture_output=True, text=True,
                              timeout=180, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout + proc.stderr

    run("up", "--no-color")
    volume = f"{project}_data"
    info = inspect_volume(docker, volume)
    assert info["Driver"] == driver.driver
    assert info["Status"]["options"] == {"size": "64M", "mode": "750"}
    assert info["Status"]["quota_bytes"] == 64 << 20
    content = docker("run", "--rm", "--network", "none", "-v", f"{volume}:/data", busybox,
                     "cat", "/data/made", "/data/copied")
    assert content.splitlines() == ["from-compose", "outside"]

    run("down", "-v")
    names = docker("volume", "ls", "--format", "{{.Name}}").split()
    assert volume not in names           # project volume removed through the plugin
    assert external in names             # external volume untouched
    assert not driver.volume_dir(volume).exists()
    docker("volume", "rm", external)
