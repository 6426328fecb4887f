"""What is mounted where, from /proc/self/mountinfo (this process's mount namespace)."""

from __future__ import annotations

import os
import re
from pathlib import Path

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
