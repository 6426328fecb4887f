"""Btrfs snapshot creation through ``fcntl.ioctl``, which releases the interpreter lock.

Why not ``btrfsutil.create_snapshot``: the binding holds the GIL for the whole ioctl, and a
snapshot commits a transaction (milliseconds, far more on a busy disk), during which no
other thread of the plugin runs: Docker's Get waited for every automatic snapshot of a
thousand-volume pass (issue 17). ``fcntl.ioctl`` drops the lock around the system call.
The call is the one libbtrfsutil makes (``BTRFS_IOC_SNAP_CREATE_V2`` on the target's
parent directory, naming the source by a descriptor); see linux/include/uapi/linux/btrfs.h.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

_SUBVOL_NAME_MAX = 4039
_SUBVOL_RDONLY = 1 << 1
# struct btrfs_ioctl_vol_args_v2: __s64 fd; __u64 transid; __u64 flags; __u64 unused[4];
# char name[BTRFS_SUBVOL_NAME_MAX + 1]  -> 4096 bytes
_ARGS = struct.Struct(f"=qQQ32x{_SUBVOL_NAME_MAX + 1}s")
# _IOW(BTRFS_IOCTL_MAGIC 0x94, 23, struct btrfs_ioctl_vol_args_v2)
_IOC_SNAP_CREATE_V2 = (1 << 30) | (_ARGS.size << 16) | (0x94 << 8) | 23


def create_snapshot(source: Path, target: Path, *, read_only: bool) -> None:
    """Snapshot the subvolume *source* as *target* (whose parent exists), without holding
    the GIL while the kernel works.

    :raises OSError: the kernel refused (``errno`` as the ioctl set it).
    """
    name = os.fsencode(target.name)
    if not name or len(name) > _SUBVOL_NAME_MAX or b"/" in name:
        raise OSError(22, f"invalid snapshot name {target.name!r}")
    src = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parent = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            args = bytearray(_ARGS.pack(src, 0, _SUBVOL_RDONLY if read_only else 0, name))
            fcntl.ioctl(parent, _IOC_SNAP_CREATE_V2, args, True)
        finally:
            os.close(parent)
    finally:
        os.close(src)
