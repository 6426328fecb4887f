"""Shared fixtures: real loop-mounted Btrfs, and the rule that a missing tier fails in CI.

``scripts/test`` sets ``SNAPVOL_REQUIRE_ALL_TIERS=1``: then a test whose tier cannot run
(not root, no mkfs.btrfs, no Docker) *fails* instead of being skipped, so CI can never pass
with a tier silently missing. A developer's quick ``pytest tests/unit`` skips them with a
reason shown by ``-ra``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REQUIRE_ALL = os.environ.get("SNAPVOL_REQUIRE_ALL_TIERS") == "1"


def need(*tools: str, root: bool = True) -> None:
    """Skip (or, under scripts/test, fail) unless we are root and *tools* are installed."""
    problems = []
    if root and os.geteuid() != 0:
        problems.append("root (mount, mkfs)")
    problems += [t for t in tools if shutil.which(t) is None]
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


def pytest_report_header(config: pytest.Config) -> str:
    tiers = {"root": os.geteuid() == 0, "btrfs": bool(shutil.which("mkfs.btrfs")),
             "docker": bool(shutil.which("dockerd")),
             "registry": bool(shutil.which("docker-registry")),
             "require-all": REQUIRE_ALL}
    return "tiers: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in tiers.items())
