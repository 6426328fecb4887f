"""Receiving in integration tests, with zfs-fuse's known fault allowed for."""

from __future__ import annotations

import io
import os
from typing import Any

from plugin.errors import PluginError


def receive_incremental(domain: Any, backend: Any, volume: str, data: bytes) -> dict[str, Any]:
    """``domain.transfers.receive`` of an incremental stream, given one more try where
    zfs-fuse answered it "I/O error".

    Why: zfs-fuse answers an incremental receive with "I/O error" now and then (more under
    load; seen on main in 2 runs of 15, and in 3 of 4 runs of the zfs-fuse tier beside other
    work). The product drops what such a receive left (``zfs_receive._drop_unaccepted``), so
    the same stream, sent again, must be taken: that is checked here too. Kernel ZFS and
    Btrfs get no second try."""
    try:
        return domain.transfers.receive(volume, io.BytesIO(data))
    except PluginError as exc:
        if backend.describe()["filesystem"] != "zfs" or os.path.exists("/dev/zfs") \
                or "I/O error" not in str(exc):
            raise
        return domain.transfers.receive(volume, io.BytesIO(data))
