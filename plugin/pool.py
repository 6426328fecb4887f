"""Where the volumes live: a Btrfs directory, or the embedded pool image, made reachable.

:func:`prepare_root` picks the storage (``SNAPVOL_BTRFS_ROOT``; else the state directory when
it is on Btrfs; else a sparse image in it, formatted and loop-mounted) and, for the managed
plugin, mounts it under the propagated mount so that every path given to Docker lies there.
It is idempotent: called at start, and again when a Mount finds the storage gone (after
``docker plugin disable -f`` unmounted everything).

:func:`ensure_pool` is conservative: it formats only an image file it has just created (or
one without a single data block, left by a crash between creating and formatting it), never
anything else, and it reuses the loop device an image is still attached to, so the same
Btrfs is never attached twice (two loop devices of one image would be two devices with one
filesystem ID).

A managed plugin also refuses to make a *new* pool image once it has had storage: it leaves
:data:`STORAGE_MARK` in its propagated mount (a directory dockerd keeps on the host for as long
as the plugin is installed, across restarts, ``disable``/``enable`` and upgrades). Without
that, an upgrade that silently put the ``data`` mount back to ``config.json``'s default (what
dockerd 20.10 and 26.1 do, while ``docker plugin inspect`` still shows the source set at
install) would start the plugin on a new empty pool: every volume "gone", and dockerd forgetting the
options and labels of each one it then asks about.
"""

from __future__ import annotations

import logging
import json
import os
from pathlib import Path

from . import process
from .config import Settings
from .errors import BackendUnavailable
from .mountinfo import mounted_filesystem

log = logging.getLogger(__name__)

_TIMEOUT = 120.0
STORAGE_MARK = ".snapvol-had-storage"    # in the managed plugin's propagated mount


def is_btrfs(path: Path) -> bool:
    """True if *path* lies on a Btrfs filesystem."""
    result = process.run(["stat", "--file-system", "--format=%T", "--", path], timeout=10)
    return result.stdout.strip() == "btrfs"


def prepare_root(settings: Settings) -> Path:
    """Make the Btrfs directory of the volumes reachable; return it.

    :raises BackendUnavailable: the storage cannot be found, created or mounted.
    """
    settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    image = settings.image_path
    directory = settings.btrfs_root
    if directory is None and not image.exists() and is_btrfs(settings.state_dir):
        directory = settings.state_dir
    if directory is None:
        if not image.exists():
            refuse_new_pool_after_storage(settings)
        ensure_pool(image, settings.pool_mountpoint, settings.pool_size)
        mark_storage(settings)
        return settings.pool_mountpoint
    if settings.publish_dir is None:
        return directory
    ensure_bind(directory, settings.pool_mountpoint)
    mark_storage(settings)
    return settings.pool_mountpoint


def mark_storage(settings: Settings) -> None:
    """Record, in a managed plugin's propagated mount, that it has had storage (see the
    module). A host install has no such place and records nothing.

    :raises BackendUnavailable: the mark cannot be written.
    """
    if settings.publish_dir is None:
        return
    mark = settings.publish_dir / STORAGE_MARK
    if mark.exists():
        return
    try:
        mark.write_text(f"{settings.state_dir}\n")
    except OSError as exc:
        raise BackendUnavailable(f"cannot write {mark}: {exc}") from None


def refuse_new_pool_after_storage(settings: Settings) -> None:
    """Refuse to make a new pool image for a managed plugin that has had storage before.

    :raises BackendUnavailable: the mark is there (its message says what to do).
    """
    if settings.publish_dir is None or not (settings.publish_dir / STORAGE_MARK).exists():
        return
    raise BackendUnavailable(
        f"no pool image {settings.image_path}, but this plugin has had its volumes before: its "
        "data mount no longer shows them (docker plugin upgrade puts mount sources back to "
        "their defaults, whatever docker plugin inspect shows). Set it again: docker plugin "
        "set PLUGIN data.source=DIR. To start with a new empty pool instead, remove "
        f"{STORAGE_MARK} from the plugin's propagated mount on the host "
        "(DOCKER_DATA_ROOT/plugins/ID/propagated-mount, /var/lib/docker by default)")


def ensure_bind(source: Path, target: Path) -> None:
    """Bind-mount the Btrfs directory *source* at *target* unless it already is."""
    target.mkdir(parents=True, exist_ok=True)
    if mounted_filesystem(target) == "btrfs":
        return
    try:
        if not is_btrfs(source):
            raise BackendUnavailable(f"{source} is not on a Btrfs filesystem")
        process.run(["mount", "--bind", "--", source, target], timeout=_TIMEOUT)
    except BackendUnavailable:
        raise
    except Exception as exc:
        raise BackendUnavailable(f"cannot bind {source} at {target}: {exc}") from None
    log.info("btrfs directory %s mounted at %s", source, target)


def attached_loop_device(image: Path) -> str | None:
    """The loop device *image* is attached to already, matched by device and inode.

    Paths cannot be compared: inside a managed plugin the image has another path than the
    one the kernel recorded.
    """
    st = os.stat(image)
    listing = process.run(["losetup", "--list", "--json", "--output", "NAME,BACK-INO,BACK-MAJ:MIN"],
                          timeout=10).stdout
    for device in json.loads(listing or "{}").get("loopdevices", []):
        major, _, minor = str(device.get("back-maj:min", "")).strip().partition(":")
        if (str(device.get("back-ino")) == str(st.st_ino) and major.isdigit() and minor.isdigit()
                and os.makedev(int(major), int(minor)) == st.st_dev):
            return device["name"]
    return None


def ensure_pool(image: Path, mountpoint: Path, size: int) -> None:
    """Make sure the Btrfs in *image* is mounted at *mountpoint*, creating it if needed.

    :raises BackendUnavailable: the image cannot be created, formatted or mounted, or
        something other than Btrfs is mounted at *mountpoint*.
    """
    mountpoint.mkdir(parents=True, exist_ok=True)
    fstype = mounted_filesystem(mountpoint)
    if fstype == "btrfs":
        return
    if fstype is not None:
        raise BackendUnavailable(f"{mountpoint} already has a {fstype} filesystem mounted; "
                                 "the embedded pool needs it free (or set SNAPVOL_BTRFS_ROOT)")
    image.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        fresh = os.stat(image).st_blocks == 0     # never written: a crash before mkfs
    else:
        try:
            os.ftruncate(fd, size)                 # sparse: costs no disk until written
        finally:
            os.close(fd)
        fresh = True
    try:
        if fresh:
            log.info("formatting new embedded pool %s (%d bytes, sparse)", image, size)
            process.run(["mkfs.btrfs", "-q", "-L", "snapvol", "--", image], timeout=_TIMEOUT)
        device = None if fresh else attached_loop_device(image)
        if device:
            process.run(["mount", "--", device, mountpoint], timeout=_TIMEOUT)
        else:
            process.run(["mount", "-o", "loop", "--", image, mountpoint], timeout=_TIMEOUT)
        if fresh:
            # The pool is ours alone: enable quotas now so every volume reports its usage.
            process.run(["btrfs", "quota", "enable", mountpoint], timeout=_TIMEOUT)
    except Exception as exc:
        raise BackendUnavailable(f"cannot set up the embedded pool {image} at {mountpoint}: {exc}") from None
    log.info("embedded pool %s mounted at %s", image, mountpoint)
