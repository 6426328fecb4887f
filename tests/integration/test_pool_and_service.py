"""The embedded pool and the domain on real Btrfs: reuse without reformatting, restarts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import btrfsutil
import pytest

from plugin.app import build_domain
from plugin.config import Settings
from plugin.errors import BackendUnavailable
from plugin.mountinfo import mounted_filesystem
from plugin.pool import STORAGE_MARK, attached_loop_device, ensure_pool, prepare_root
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
    first = build_domain(settings)
    first.volumes.create("v1", {"size": "10M"})
    first.volumes.create("v2", None)
    path = first.volumes.mount("v1", "a" * 64)
    first.volumes.mount("v2", "b" * 64)
    (path / "f").write_text("x")
    # v2 disappears behind our back while we are "down": the restart forgets its mount IDs.
    btrfsutil.delete_subvolume(settings.pool_mountpoint / "volumes" / "v2")
    second = build_domain(settings)
    assert second.status.get("v1").status["mounts"] == 1
    assert [v["name"] for v in second.status.describe_volumes()] == ["v1"]
    assert second.status.describe()["mounts"] == 1
    second.volumes.unmount("v1", "a" * 64)                 # the old ID's Unmount arrives after restart
    second.volumes.remove("v1")
    assert second.volumes.list() == []


def test_remount_reuses_the_loop_device_still_attached(pool_dir):
    """A volume still bind-mounted somewhere keeps the loop device: mount that, never a second."""
    image, mnt, holder = pool_dir / "pool.img", pool_dir / "pool", pool_dir / "holder"
    ensure_pool(image, mnt, 300 << 20)
    device = attached_loop_device(image)
    assert device and device.startswith("/dev/loop")
    holder.mkdir()
    subprocess.run(["mount", "--bind", str(mnt), str(holder)], check=True)   # like a container
    try:
        subprocess.run(["umount", str(mnt)], check=True)
        assert attached_loop_device(image) == device
        ensure_pool(image, mnt, 300 << 20)
        assert attached_loop_device(image) == device
        out = subprocess.run(["losetup", "--associated", str(image)], capture_output=True,
                             text=True, check=True).stdout
        assert len(out.splitlines()) == 1
    finally:
        subprocess.run(["umount", str(holder)], check=True)


def test_state_dir_on_btrfs_holds_the_volumes_directly(btrfs_mount):
    settings = Settings.from_env({"SNAPVOL_STATE_DIR": str(btrfs_mount / "state"),
                                  "SNAPVOL_RUN_DIR": str(btrfs_mount / "run")})
    assert prepare_root(settings) == btrfs_mount / "state"
    assert not (btrfs_mount / "state" / "pool.img").exists()


def test_publish_dir_binds_a_btrfs_directory(btrfs_mount, tmp_path):
    publish = tmp_path / "published"
    settings = Settings.from_env({"SNAPVOL_BTRFS_ROOT": str(btrfs_mount),
                                  "SNAPVOL_STATE_DIR": str(tmp_path / "state"),
                                  "SNAPVOL_PUBLISH_DIR": str(publish)})
    try:
        root = prepare_root(settings)
        assert root == publish / "pool" and mounted_filesystem(root) == "btrfs"
        (btrfs_mount / "seen").write_text("x")
        assert (root / "seen").read_text() == "x"
        assert prepare_root(settings) == root            # idempotent
    finally:
        subprocess.run(["umount", str(publish / "pool")], check=False)


def test_managed_plugin_refuses_a_new_pool_once_it_had_one(pool_dir, tmp_path):
    """A managed plugin whose data mount no longer shows its pool (an upgrade put the
    source back to its default) refuses to make a new empty one, saying what to do; its own
    pool still mounts; without the mark a new pool is made as on a fresh install."""
    publish = tmp_path / "published"

    def settings(state: Path) -> Settings:
        return Settings.from_env({"SNAPVOL_STATE_DIR": str(state), "SNAPVOL_POOL_SIZE": "300M",
                                  "SNAPVOL_RUN_DIR": str(tmp_path / "run"),
                                  "SNAPVOL_PUBLISH_DIR": str(publish)})

    ours, elsewhere = pool_dir / "ours", tmp_path / "default-source" / "snapvol"
    root = publish / "pool"
    try:
        assert prepare_root(settings(ours)) == root and mounted_filesystem(root) == "btrfs"
        (root / "precious").write_text("kept")
        assert (publish / STORAGE_MARK).exists()
        subprocess.run(["umount", str(root)], check=True)        # disable -f, upgrade

        with pytest.raises(BackendUnavailable) as refused:
            prepare_root(settings(elsewhere))
        assert "this plugin has had its volumes before" in str(refused.value)
        assert "docker plugin set PLUGIN data.source=DIR" in str(refused.value)
        assert not (elsewhere / "pool.img").exists() and mounted_filesystem(root) is None

        assert prepare_root(settings(ours)) == root                # the source set again
        assert (root / "precious").read_text() == "kept"
        subprocess.run(["umount", str(root)], check=True)

        (publish / STORAGE_MARK).unlink()                          # "start anew", on purpose
        assert prepare_root(settings(elsewhere)) == root
        assert (elsewhere / "pool.img").exists() and not (root / "precious").exists()
    finally:
        if mounted_filesystem(root):
            subprocess.run(["umount", str(root)], check=True)


def test_host_install_makes_a_new_pool_where_its_image_went(pool_dir):
    """No propagated mount, no mark: a host install whose image is gone makes a new pool
    (scripts/run's state directory is the user's to manage)."""
    settings = Settings.from_env({"SNAPVOL_STATE_DIR": str(pool_dir), "SNAPVOL_POOL_SIZE": "300M",
                                  "SNAPVOL_RUN_DIR": str(pool_dir / "run")})
    assert prepare_root(settings) == pool_dir / "pool"
    subprocess.run(["umount", str(pool_dir / "pool")], check=True)
    (pool_dir / "pool.img").unlink()
    assert prepare_root(settings) == pool_dir / "pool"
    assert not list(pool_dir.glob(f"**/{STORAGE_MARK}"))


def test_mount_recovers_storage_that_was_unmounted(pool_dir):
    """After `docker plugin disable -f` unmounted the pool, the next Mount mounts it again."""
    settings = Settings.from_env({"SNAPVOL_STATE_DIR": str(pool_dir), "SNAPVOL_POOL_SIZE": "300M",
                                  "SNAPVOL_RUN_DIR": str(pool_dir / "run")})
    domain = build_domain(settings)
    domain.volumes.create("v1", None)
    (domain.volumes.mount("v1", "a" * 64) / "f").write_text("kept")
    subprocess.run(["umount", str(settings.pool_mountpoint)], check=True)
    assert domain.status.get("v1").status["state"] == "unavailable"      # Get does not purge it
    assert (domain.volumes.mount("v1", "b" * 64) / "f").read_text() == "kept"
