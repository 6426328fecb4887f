"""The volume checklist through a real dockerd: what a user does with `docker volume` and `run`."""

from __future__ import annotations

import re

from tests.e2e.harness import inspect_volume, unique

RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
RUN = ("run", "--rm", "--network", "none")


def test_full_checklist(docker, driver, busybox):
    name = unique("check")
    docker("volume", "create", "-d", driver.driver, "-o", "size=200M", "-o", "mode=0777", name)
    listed = docker("volume", "ls", "--filter", f"driver={driver.driver}", "--format", "{{.Name}}")
    assert name in listed.split()

    info = inspect_volume(docker, name)
    assert info["Driver"] == driver.driver
    assert info["Options"] == {"size": "200M", "mode": "0777"}
    assert RFC3339.fullmatch(info["CreatedAt"])
    status = info["Status"]
    assert status["backend"] == driver.backend
    assert status["options"] == {"size": "200M", "mode": "777"}
    assert status["quota_bytes"] == 200 << 20
    assert isinstance(status["used_bytes"], int)

    writer = unique("writer")
    written = docker("run", "--name", writer, "--network", "none", "-v", f"{name}:/data", busybox,
                     "sh", "-c", "echo hello snapvol > /data/greeting && "
                     "dd if=/dev/urandom of=/data/random bs=1M count=10 2>/dev/null && "
                     "cd /data && md5sum random | tee random.md5")
    docker("rm", writer)
    read = docker(*RUN, "-v", f"{name}:/data", busybox,
                  "sh", "-c", "cat /data/greeting && cd /data && md5sum -c random.md5 && md5sum random")
    assert read.splitlines() == ["hello snapvol", "random: OK", written.strip()]

    # two containers share the volume at the same time
    holder = assert_shared_and_kept_while_in_use(docker, busybox, name)
    docker("rm", "-f", holder)
    assert inspect_volume(docker, name)["Status"]["mounts"] == 0

    docker("volume", "rm", name)
    assert name not in docker("volume", "ls", "--format", "{{.Name}}").split()
    assert not driver.volume_dir(name).exists()


def test_mount_flag_with_volume_opts(docker, driver, busybox):
    name = unique("mountopt")
    out = docker(*RUN, "--mount", f"type=volume,source={name},target=/data,"
                 f"volume-driver={driver.driver},volume-opt=uid=1234,volume-opt=size=64M",
                 busybox, "stat", "-c", "%u", "/data")
    assert out.strip() == "1234"
    status = inspect_volume(docker, name)["Status"]
    assert status["options"] == {"size": "64M", "uid": "1234"}
    docker("volume", "rm", name)


def test_implicit_creation_by_docker_run(docker, driver, busybox):
    """`docker run --volume-driver` creates the volume with Opts: null."""
    name = unique("implicit")
    docker(*RUN, "--volume-driver", driver.driver, "-v", f"{name}:/data", busybox,
           "sh", "-c", "echo implicit > /data/f")
    info = inspect_volume(docker, name)
    assert info["Driver"] == driver.driver and info["Status"]["options"] == {}
    assert docker(*RUN, "-v", f"{name}:/data", busybox, "cat", "/data/f").strip() == "implicit"
    docker("volume", "rm", name)


def test_size_quota_stops_writes(docker, driver, busybox):
    name = unique("quota")
    docker("volume", "create", "-d", driver.driver, "-o", "size=20M", name)
    result = docker.result(*RUN, "-v", f"{name}:/data", busybox, "sh", "-c",
                           "dd if=/dev/urandom of=/data/big bs=1M count=40 conv=fsync")
    assert result.returncode != 0
    assert "Disk quota exceeded" in result.stderr
    size = docker(*RUN, "-v", f"{name}:/data", busybox, "sh", "-c", "wc -c < /data/big").strip()
    assert int(size) <= 20 << 20
    docker("volume", "rm", name)


def test_uid_gid_mode_inside_a_container(docker, driver, busybox):
    name = unique("owner")
    docker("volume", "create", "-d", driver.driver, "-o", "uid=1234", "-o", "gid=2345",
           "-o", "mode=0750", name)
    assert docker(*RUN, "-v", f"{name}:/data", busybox, "stat", "-c", "%u:%g %a", "/data").strip() \
        == "1234:2345 750"
    docker(*RUN, "--user", "1234:2345", "-v", f"{name}:/data", busybox, "touch", "/data/mine")
    denied = docker.result(*RUN, "--user", "999:999", "-v", f"{name}:/data", busybox,
                           "touch", "/data/theirs")
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    docker("volume", "rm", name)


def test_bad_create_through_docker_shows_plugin_error(docker, driver):
    result = docker.result("volume", "create", "-d", driver.driver, "-o", "bogus=1", unique("bad"))
    assert result.returncode != 0
    assert f"VolumeDriver.Create: unknown option(s): 'bogus'; {driver.backend} volumes accept:" in result.stderr
    result = docker.result("volume", "create", "-d", driver.driver, "-o", "size=lots", unique("bad"))
    assert "option size='lots': expected a whole number" in result.stderr
    assert not [n for n in docker("volume", "ls", "--format", "{{.Name}}").split()
                if n.startswith("bad-")]


def test_cli_lists_what_docker_created(docker, driver):
    import io

    from plugin.cli import main
    name = unique("cli")
    docker("volume", "create", "-d", driver.driver, "-o", "size=32M", name)
    out, err = io.StringIO(), io.StringIO()
    assert main(["ls", "--socket", str(driver.socket)], stdout=out, stderr=err) == 0
    row = next(line for line in out.getvalue().splitlines() if line.startswith(name))
    assert row.split()[2] == "32.0M" and "size=32M" in row
    docker("volume", "rm", name)


def assert_shared_and_kept_while_in_use(docker, busybox: str, name: str) -> str:
    """Two containers use volume *name* at once (one answers the other through it), the
    plugin counts the one still running as its only mount, and ``docker volume rm`` is
    refused while it runs. Returns that container's name (still running: the caller ends it)."""
    holder = unique("holder")
    docker("run", "-d", "--name", holder, "--network", "none", "-v", f"{name}:/shared", busybox,
           "sh", "-c", "while [ ! -f /shared/ping ]; do sleep 0.1; done; echo pong > /shared/pong; "
           "exec sleep 300")
    reply = docker(*RUN, "-v", f"{name}:/data", busybox, "sh", "-c",
                   "echo ping > /data/ping; for i in $(seq 100); do "
                   "[ -f /data/pong ] && cat /data/pong && exit 0; sleep 0.1; done; exit 1")
    assert reply.strip() == "pong"
    assert inspect_volume(docker, name)["Status"]["mounts"] == 1
    refused = docker.result("volume", "rm", name)
    assert refused.returncode != 0 and "volume is in use" in refused.stderr
    return holder
