"""Shared fixtures: real loop-mounted Btrfs, and the rule that a missing tier fails in CI.

``scripts/test`` sets ``SNAPVOL_REQUIRE_ALL_TIERS=1``: then a test whose tier cannot run
(not root, no mkfs.btrfs, no Docker) *fails* instead of being skipped, so CI can never pass
with a tier silently missing. A developer's quick ``pytest tests/unit`` skips them with a
reason shown by ``-ra``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REQUIRE_ALL = os.environ.get("SNAPVOL_REQUIRE_ALL_TIERS") == "1"


def need(*tools: str, root: bool = True, modules: dict[str, bool] | None = None) -> None:
    """Skip (or, under scripts/test, fail) unless we are root and *tools* are installed, and
    each of *modules* (a package's name -> whether it is there) is."""
    problems = []
    if root and os.geteuid() != 0:
        problems.append("root (mount, mkfs)")
    problems += [t for t in tools if shutil.which(t) is None]
    problems += [name for name, there in (modules or {}).items() if not there]
    if problems:
        message = f"needs {', '.join(problems)}"
        if REQUIRE_ALL:
            pytest.fail(message + " (SNAPVOL_REQUIRE_ALL_TIERS=1: no tier may be skipped)")
        pytest.skip(message)


def make_btrfs(directory: Path, size: int = 512 << 20) -> Path:
    """Create a sparse image in *directory*, format it Btrfs and loop-mount it; return the mount."""
    image, mnt = directory / "btrfs.img", directory / "mnt"
    with image.open("wb") as f:
        f.truncate(size)
    mnt.mkdir()
    subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True, stdout=subprocess.DEVNULL)
    # "loop": mount(8) picks a free loop device and frees it again on umount.
    subprocess.run(["mount", "-o", "loop", "--", str(image), str(mnt)], check=True)
    return mnt


def unmount(mnt: Path) -> None:
    subprocess.run(["umount", "-R", str(mnt)], check=True)


@pytest.fixture
def btrfs_mount(tmp_path: Path) -> Iterator[Path]:
    """A fresh, empty Btrfs on a sparse file, loop-mounted (libbtrfsutil's test recipe)."""
    need("mkfs.btrfs", "mount", "umount")
    mnt = make_btrfs(tmp_path)
    try:
        yield mnt
    finally:
        unmount(mnt)


def _zfs_answers() -> bool:
    return subprocess.run(["zpool", "list", "-H"], capture_output=True, timeout=30).returncode == 0


@contextmanager
def zfs_running() -> Iterator[None]:
    """A ZFS that answers: the kernel's (/dev/zfs), a running zfs-fuse, or a zfs-fuse we start
    (and stop again at the end; one that was already running is left alone). Also used
    outside pytest (scripts/torture)."""
    need("zpool", "zfs")
    if os.path.exists("/dev/zfs") or (os.path.exists("/var/run/zfs/zfs_socket") and _zfs_answers()):
        yield
        return
    need("zfs-fuse")
    pidfile = Path(tempfile.mkdtemp(prefix="snapvol-zfs-fuse-")) / "zfs-fuse.pid"
    subprocess.run(["zfs-fuse", "--pidfile", str(pidfile)], check=True, timeout=60)
    for _ in range(100):
        if _zfs_answers():
            break
        time.sleep(0.1)
    else:
        pytest.fail("zfs-fuse did not answer")
    try:
        yield
    finally:
        stop_daemon(int(pidfile.read_text()))
        shutil.rmtree(pidfile.parent, ignore_errors=True)


def _gone(pid: int) -> bool:
    """True once *pid* has exited: no such process, or a zombie (zfs-fuse daemonizes, so its
    parent is init, and not every init here reaps at once)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def stop_daemon(pid: int, grace: float = 120.0) -> None:
    """SIGTERM a daemon we started and wait until it has really exited (SIGKILL after *grace*
    seconds). zfs-fuse takes its time to exit after SIGTERM (still running 5 s later here,
    after a short run): whoever comes next must not find it still answering, take it for a
    running ZFS and lose it a moment later (a hand-off torture that followed the crash
    torture did, in a clean-clone rehearsal)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30.0)):
        os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if _gone(pid):
                return
            time.sleep(0.1)
    raise AssertionError(f"the daemon {pid} did not exit after SIGKILL")


@pytest.fixture(scope="session")
def zfs_service() -> Iterator[None]:
    """See :func:`zfs_running`."""
    with zfs_running():
        yield


def make_pool(directory: Path, size: int = 512 << 20) -> str:
    """A pool on a sparse file vdev with a random name (never one someone else could own);
    the vdev is named after the pool, so several pools can live in one directory."""
    name = f"snapvoltest-{uuid.uuid4().hex[:8]}"
    vdev = directory / f"{name}.img"
    with vdev.open("wb") as f:
        f.truncate(size)
    subprocess.run(["zpool", "create", "-m", "none", name, str(vdev)], check=True,
                   capture_output=True)
    return name


def destroy_pool(name: str) -> None:
    """Destroy a pool we made; zfs-fuse may call it busy for a moment after unmounts."""
    for attempt in range(50):
        result = subprocess.run(["zpool", "destroy", "-f", name], capture_output=True, text=True)
        if result.returncode == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"zpool destroy {name} failed: {result.stderr}")


@pytest.fixture
def zfs_pool(zfs_service: None, tmp_path: Path) -> Iterator[str]:
    name = make_pool(tmp_path)
    try:
        yield name
    finally:
        destroy_pool(name)


def write_until_refused(path: Path, megabytes: int) -> OSError:
    """Write random data to *path* one MiB at a time, synced; return the error that stopped
    it (a quota must stop it before *megabytes*)."""
    try:
        with open(path, "wb") as f:
            for _ in range(megabytes):
                f.write(os.urandom(1 << 20))
                f.flush()
                os.fsync(f.fileno())
    except OSError as exc:
        return exc
    raise AssertionError(f"{megabytes} MiB written to {path} without any error")


def assert_refuses_foreign(backend, name: str) -> None:
    """Something under the backend's root that snapvol did not make is no volume of ours:
    not listed, not found, not attachable, not destroyable, not replaceable."""
    from plugin.errors import VolumeExists, VolumeNotFound
    assert name not in [v.name for v in backend.volumes()]
    for call in (backend.volume, backend.attach, backend.destroy_volume):
        with pytest.raises(VolumeNotFound):
            call(name)
    with pytest.raises(VolumeExists, match=r"made by something else \(not snapvol\)"):
        backend.create_volume(name, {})


def pytest_report_header(config: pytest.Config) -> str:
    tiers = {"root": os.geteuid() == 0, "btrfs": bool(shutil.which("mkfs.btrfs")),
             "docker": bool(shutil.which("dockerd")),
             "registry": bool(shutil.which("docker-registry")),
             "zfs": os.path.exists("/dev/zfs") and "kernel" or bool(shutil.which("zfs-fuse")) and "zfs-fuse",
             "require-all": REQUIRE_ALL}
    return "tiers: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in tiers.items())
