"""Btrfs snapshot creation through ``ctypes``, which releases the interpreter lock.

Why not ``btrfsutil.create_snapshot``: the binding holds the GIL for the whole ioctl, and a
snapshot commits a transaction (milliseconds, far more on a busy disk), during which no
other thread of the plugin runs: Docker's Get waited for every automatic snapshot of a
thousand-volume pass (issue 17). ``fcntl.ioctl`` is no way out: it keeps the GIL for a
mutable buffer above 1 KiB (CPython's "think array.resize()"), and this one is 4 KiB. A
``ctypes`` call drops the lock for its duration.

The call is the one libbtrfsutil makes: ``BTRFS_IOC_SNAP_CREATE_V2`` on the target's
parent directory, naming the source by a descriptor (linux/include/uapi/linux/btrfs.h).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

SUBVOL_NAME_MAX = 4039
_SUBVOL_RDONLY = 1 << 1
_ARGS_SIZE = 4096     # struct btrfs_ioctl_vol_args_v2
# _IOW(BTRFS_IOCTL_MAGIC 0x94, 23, struct btrfs_ioctl_vol_args_v2)
IOC_SNAP_CREATE_V2 = (1 << 30) | (_ARGS_SIZE << 16) | (0x94 << 8) | 23


@cache
def _ioctl() -> tuple[Any, type]:
    """libc's ioctl and the argument structure, made on first use (no import-time I/O)."""
    import ctypes

    class VolArgsV2(ctypes.Structure):
        _fields_ = [("fd", ctypes.c_int64), ("transid", ctypes.c_uint64),
                    ("flags", ctypes.c_uint64), ("unused", ctypes.c_uint64 * 4),
                    ("name", ctypes.c_char * (SUBVOL_NAME_MAX + 1))]

    assert ctypes.sizeof(VolArgsV2) == _ARGS_SIZE
    ioctl = ctypes.CDLL(None, use_errno=True).ioctl     # CDLL: the GIL is released
    ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.POINTER(VolArgsV2)]
    ioctl.restype = ctypes.c_int
    return ioctl, VolArgsV2


def create_snapshot(source: Path, target: Path, *, read_only: bool) -> None:
    """Snapshot the subvolume *source* as *target* (whose parent exists), without holding
    the GIL while the kernel works.

    :raises OSError: the kernel refused (``errno`` as the ioctl set it).
    """
    import ctypes

    name = os.fsencode(target.name)
    if not name or len(name) > SUBVOL_NAME_MAX or b"/" in name:
        raise OSError(22, f"invalid snapshot name {target.name!r}")
    ioctl, VolArgsV2 = _ioctl()
    src = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parent = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            args = VolArgsV2(fd=src, flags=_SUBVOL_RDONLY if read_only else 0, name=name)
            if ioctl(parent, IOC_SNAP_CREATE_V2, ctypes.byref(args)) < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"{os.strerror(err)}: cannot snapshot {source} as {target}")
        finally:
            os.close(parent)
    finally:
        os.close(src)
