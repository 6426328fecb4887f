"""The embedded default pool: a sparse Btrfs image, loop-mounted, when no root is configured.

``ensure_pool`` is idempotent and conservative: it formats only an image file it has just
created (or one that has no data blocks at all, left by a crash between creating and
formatting it), and never reformats anything else. On restart it mounts the existing image.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from . import process
from .errors import BackendUnavailable

log = logging.getLogger(__name__)

_TIMEOUT = 120.0
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")  # mountinfo writes ' ' as \040


def mounted_filesystem(mountpoint: Path) -> str | None:
    """The filesystem type mounted exactly at *mountpoint*, or ``None`` (from mountinfo)."""
    target = os.path.realpath(mountpoint)
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            # 4: mount point (octal-escaped); after the " - " separator: fstype, source, options
            point = _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
            if point == target:
                found = fields[fields.index("-") + 1]   # the last entry is the visible mount
    return found


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
        process.run(["mount", "-o", "loop", "--", image, mountpoint], timeout=_TIMEOUT)
        if fresh:
            # The pool is ours alone: enable quotas now so every volume reports its usage.
            process.run(["btrfs", "quota", "enable", mountpoint], timeout=_TIMEOUT)
    except Exception as exc:
        raise BackendUnavailable(f"cannot set up the embedded pool {image} at {mountpoint}: {exc}") from None
    log.info("embedded pool %s mounted at %s", image, mountpoint)
