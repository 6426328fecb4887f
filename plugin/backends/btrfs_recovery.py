"""What a crash leaves in a Btrfs layout, and how it is finished or removed.

Every operation that could leave something half-made works in staging, under a name that
says what it was doing (:mod:`.btrfs_layout`):

    recv.<volume>.<hex>      a receive's inbox: removed with what it holds
    replaced.<volume>.<hex>  the volume a rollback took out: put back if the volume is
                             missing (the rollback stopped between its two renames), else
                             removed
    create. clone. rollback. remove.  half-made or half-destroyed volumes: removed (those
                             of create, clone and rollback also before the mark was
                             written: a subvolume under such a name in staging is ours)

Snapshots in ``snapshots/<name>/`` of a volume that no longer exists (a Remove or a full
receive interrupted by a crash) are orphans: deleted, so a new volume of that name never
inherits them. Entries that do not carry snapvol's mark are never touched.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import btrfsutil

from .. import names
from ..errors import BackendError, InvalidName
from .base import Leftover
from .btrfs_layout import Layout

log = logging.getLogger(__name__)

# a subvolume made here by create, clone or rollback, marked only after it was made
_BUILT = re.compile(r"(create|clone|rollback)\.[A-Za-z0-9][A-Za-z0-9_.-]*\.[0-9a-f]{8}")


def _ours(layout: Layout, entry: os.DirEntry[str]) -> bool:
    """Whether a staging entry is snapvol's: it carries the mark, or it is a subvolume an
    interrupted create, clone or rollback made and had not marked yet."""
    path = Path(entry.path)
    if not entry.is_dir(follow_symlinks=False):
        return False
    if layout.is_ours(path):
        return True
    return bool(_BUILT.fullmatch(entry.name)) and btrfsutil.is_subvolume(path)


def leftovers(layout: Layout) -> list[Leftover]:
    """What :func:`finish_interrupted` would do, found without changing anything."""
    found = []
    for entry in os.scandir(layout.staging_dir):
        path = Path(entry.path)
        # staging names are <operation>.<volume>.<random hex>
        volume = entry.name.partition(".")[2].rpartition(".")[0]
        if entry.name.startswith("recv.") and entry.is_dir(follow_symlinks=False):
            found.append(Leftover(volume, f"{path}: an interrupted receive", "remove it"))
        elif not _ours(layout, entry):
            continue                            # not ours: never touched, not reported
        elif entry.name.startswith("replaced.") and not os.path.lexists(layout.volumes_dir / volume):
            found.append(Leftover(volume, f"{path}: a volume an interrupted rollback took "
                                  "out", "put it back"))
        else:
            found.append(Leftover(volume, f"{path}: left by an interrupted operation",
                                  "remove it"))
    for entry in os.scandir(layout.snapshots_dir):
        if (entry.is_dir(follow_symlinks=False) and not os.path.lexists(layout.volumes_dir / entry.name)
                and not layout.renaming(Path(entry.path))):
            mine = [e.name for e in os.scandir(entry.path) if layout.is_ours(Path(e.path))]
            if mine:
                found.append(Leftover(entry.name, f"{entry.path}: snapshot(s) "
                                      f"{', '.join(sorted(mine))} of a volume that no longer "
                                      "exists", "delete them"))
    return found


def finish_interrupted(layout: Layout) -> None:
    """Destroy what a crash left in staging: half-made or half-destroyed volumes of ours."""
    for entry in os.scandir(layout.staging_dir):
        path = Path(entry.path)
        if entry.name.startswith("recv.") and entry.is_dir(follow_symlinks=False):
            log.info("removing the interrupted receive %s", path)
            empty_inbox(path)
            continue
        if not _ours(layout, entry):
            log.warning("leaving unknown entry %s in staging alone", path)
            continue
        if path.name.startswith("replaced."):
            # a rollback stopped between its two renames: put the volume back
            name = path.name.removeprefix("replaced.").rsplit(".", 1)[0]
            if not os.path.lexists(layout.volumes_dir / name):
                log.warning("restoring volume %s from an interrupted rollback", name)
                os.rename(path, layout.volumes_dir / name)
                continue
        log.info("removing %s left by an interrupted operation", path)
        try:
            layout.delete_subvolume(path)
        except BackendError as exc:   # never invisible to Docker; retried at next start
            log.error("could not remove %s: %s", path, exc)
    # after the rollbacks above were put back: snapshots whose volume is gone are orphans
    for entry in os.scandir(layout.snapshots_dir):
        if (entry.is_dir(follow_symlinks=False) and not os.path.lexists(layout.volumes_dir / entry.name)
                and not layout.renaming(Path(entry.path))):    # its owner finishes the rename
            try:
                sweep_orphan_snapshots(layout, entry.name)
            except (BackendError, InvalidName) as exc:
                log.error("could not remove the orphan snapshots in %s: %s", entry.path, exc)


def sweep_orphan_snapshots(layout: Layout, name: str, *, level: int = logging.WARNING) -> None:
    """Delete the snapshots left in snapshots/<name>/ by a volume that no longer exists
    (a Remove or a full receive interrupted by a crash), so a new volume of that name never
    inherits them. Caller: the volume does not exist, and nothing is creating it; *level*
    is INFO where this is the normal end of a Remove, not a repair.
    Idempotent: a crash midway leaves the rest for the next call."""
    directory = layout.snapshots_dir / names.stored_volume_name(name)
    if not directory.is_dir() or os.path.lexists(layout.path(name)) or layout.renaming(directory):
        return
    for entry in os.scandir(directory):
        path = Path(entry.path)
        if layout.is_ours(path):
            log.log(level, "deleting snapshot %s@%s of a volume that no longer exists", name,
                    entry.name)
            layout.delete_subvolume(path)
    try:
        directory.rmdir()
    except OSError:
        log.warning("left %s: it holds something snapvol did not make", directory)


def empty_inbox(inbox: Path) -> None:
    """Remove a receive's inbox and the subvolumes in it (read-only ones included); what
    cannot be removed is logged and left."""
    for entry in os.scandir(inbox) if inbox.is_dir() else ():
        try:
            if btrfsutil.is_subvolume(entry.path):
                btrfsutil.set_subvolume_read_only(entry.path, False)
                btrfsutil.delete_subvolume(entry.path)
            else:
                log.warning("leaving %s in %s", entry.name, inbox)
        except OSError as exc:
            log.error("cannot remove %s: %s", entry.path, exc)
    try:
        inbox.rmdir()
    except OSError:
        pass
