"""The embedded pool and the service on real Btrfs: reuse without reformatting, restarts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import btrfsutil
import pytest

from plugin.app import build_service
from plugin.config import Settings
from plugin.errors import BackendUnavailable
from plugin.pool import ensure_pool, mounted_filesystem
from tests.conftest import need


@pytest.fixture
def pool_dir(tmp_path: Path):
    need("mkfs.btrfs", "mount", "umount")
    yield tmp_path
    mnt = tmp_path / "pool"
    if mnt.exists() and mounted_filesystem(mnt):
        subprocess.run(["umount", str(mnt)], check=True)


def test_pool_created_once_then_reused_never_reformatted(pool_dir):
    image, mnt = pool_dir / "pool.img", pool_dir / "pool"
    ensure_pool(image, mnt, 300 << 20)
    assert mounted_filesystem(mnt) == "btrfs"
    assert image.stat().st_size == 300 << 20
    assert image.stat().st_blocks * 512 < 100 << 20     # sparse
    (mnt / "data").write_text("precious")
    ensure_pool(image, mnt, 300 << 20)                  # already mounted: nothing happens
    subprocess.run(["umount", str(mnt)], check=True)
    ensure_pool(image, mnt, 300 << 20)                  # restart: mount, do not mkfs
    assert (mnt / "data").read_text() == "precious"


def test_pool_refuses_to_format_an_image_with_data(pool_dir):
    image = pool_dir / "pool.img"
    image.write_bytes(b"not a filesystem" * 1000)
    with pytest.raises(BackendUnavailable, match="cannot set up the embedded pool"):
        ensure_pool(image, pool_dir / "pool", 300 << 20)
    assert image.read_bytes().startswith(b"not a filesystem")


def test_pool_refuses_a_foreign_mount(pool_dir):
    mnt = pool_dir / "pool"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], check=True)
    with pytest.raises(BackendUnavailable, match="already has a tmpfs filesystem mounted"):
        ensure_pool(pool_dir / "pool.img", mnt, 300 << 20)


def test_service_restart_keeps_mount_ids_and_reconciles(pool_dir):
    settings = Settings.from_env({"SNAPVOL_STATE_DIR": str(pool_dir), "SNAPVOL_POOL_SIZE": "300M",
                                  "SNAPVOL_RUN_DIR": str(pool_dir / "run")})
    first = build_service(settings)
    first.create("v1", {"size": "10M"})
    first.create("v2", None)
    path = first.mount("v1", "a" * 64)
    first.mount("v2", "b" * 64)
    (path / "f").write_text("x")
    # v2 disappears behind our back while we are "down": the restart forgets its mount IDs.
    btrfsutil.delete_subvolume(settings.data_root / "volumes" / "v2")
    second = build_service(settings)
    assert second.get("v1").status["mounts"] == 1
    assert [v["name"] for v in second.describe_volumes()] == ["v1"]
    assert second.describe()["mounts"] == 1
    second.unmount("v1", "a" * 64)                 # the old ID's Unmount arrives after restart
    second.remove("v1")
    assert second.list() == []
