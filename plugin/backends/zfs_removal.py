"""Removing ZFS volumes, and what interrupted operations left behind.

ZFS refuses to destroy a dataset while a volume is cloned from one of its snapshots, so a
Remove promotes such clones first: each takes over the snapshots it needs and keeps working.
A removal is marked (``snapvol:owner=removing``) before anything moves, so a crash midway
leaves a dataset that start-up recognises and finishes, never a volume that is visible
without its snapshots. Start-up also destroys datasets left "creating" and the inboxes of
receives that cannot resume (:mod:`.zfs_receive`).
"""

from __future__ import annotations

import errno
import logging
import re

from .. import names
from ..errors import BackendError, CommandFailed
from .base import Leftover
from .zfs_commands import ZfsCommands
from .zfs_layout import OWNER, Layout
from .zfs_receive import INBOX, Receiver

log = logging.getLogger(__name__)

# a full pool refuses property changes (ZFS keeps its slop space for destroys)
_OUT_OF_SPACE = re.compile(r"out of space|no space left", re.IGNORECASE)


class Remover:
    """Destroys the volumes of *layout* and the leftovers of crashed operations (the caller
    holds the volume lock)."""

    def __init__(self, zfs: ZfsCommands, layout: Layout, receiver: Receiver) -> None:
        self._zfs = zfs
        self._layout = layout
        self._receiver = receiver
        self._root = layout.root
        self._index = layout.index

    def leftovers(self) -> list[Leftover]:
        """What :meth:`finish_interrupted` would do, found without changing anything (from
        a fresh listing: what a crashed operation left is not something the index saw)."""
        found = []
        for name, props in self._index.sync().items():
            dataset = f"{self._root}/{name}"
            if name.startswith(INBOX):
                if not self._receiver.token(dataset):        # else: kept for a resume
                    found.append(Leftover(name.removeprefix(INBOX),
                                          f"{dataset}: an interrupted receive", "destroy it"))
            elif props.get(OWNER) in ("creating", "removing"):
                found.append(Leftover(name, f"{dataset}: left {props[OWNER]} by an interrupted "
                                      "operation", "destroy it"))
        return found

    def finish_interrupted(self) -> None:
        """Destroy what crashed operations left: inboxes of receives that cannot resume,
        datasets left "creating" or "removing"."""
        for name, props in list(self._layout.children().items()):
            if name.startswith(INBOX):
                self._index.invalidate()         # aborted, destroyed or kept: listed again
                self._receiver.drop_inbox(f"{self._root}/{name}", keep_resumable=True)
            elif props.get(OWNER) in ("creating", "removing"):
                log.info("destroying %s/%s left %s by an interrupted operation",
                         self._root, name, props[OWNER])
                try:
                    if props[OWNER] == "removing":      # clones first, as destroy_volume does
                        self.promote_clones(f"{self._root}/{name}")
                    self._layout.destroy(f"{self._root}/{name}", mounted=props.get("mounted") == "yes")
                except BackendError as exc:
                    log.error("could not destroy %s/%s: %s", self._root, name, exc)

    def destroy_volume(self, name: str) -> None:
        """Destroy the dataset and its snapshots; volumes cloned from one of them are
        promoted first (they take over the snapshots they need), so they keep working.

        The mark comes first: promoting moves snapshots away, so a kill after it must not
        leave the volume visible without them; start-up finishes a marked removal. A volume
        no client sees (an internal name: the trash's, a verification's clone) has its
        clones promoted before the mark instead: nobody sees it lose snapshots, and a
        promote refused on a full pool (zfs-fuse keeps no slop space for it) then changes
        nothing, so the caller can give up cleanly and try again later."""
        dataset = self._layout.owned(name)
        child = names.stored_volume_name(name)
        if names.is_internal(name):
            self.promote_clones(dataset)
        marked = False
        try:
            self._zfs.set(dataset, OWNER, "removing")       # invisible from here on
            self._index.note(child, OWNER, "removing")
            marked = True
        except CommandFailed as exc:
            if not _OUT_OF_SPACE.search(exc.stderr):
                raise
            # Removing a volume is how a user frees space on a full pool: without the mark,
            # a crash from here leaves the volume visible, and a repeated Remove finishes it.
            log.warning("pool full: removing volume %s without marking it first", name)
        try:
            try:
                self.promote_clones(dataset)
                self._layout.destroy(dataset, mounted=True)
            except BackendError as exc:
                if "clone" not in str(exc) and exc.errno != errno.EEXIST:
                    raise
                # a clone made behind the index's back refuses the destroy: the filesystem
                # knows it, so re-sync once and promote it too
                self._index.sync()
                self.promote_clones(dataset)
                self._layout.destroy(dataset, mounted=True)
        except BackendError:
            # refused (a promote out of space, a busy dataset): visible again, so that the
            # Remove can be retried, never an invisible volume nobody can remove
            if marked:
                try:
                    self._zfs.set(dataset, OWNER, "snapvol")
                    self._index.note(child, OWNER, "snapvol")
                except BackendError as exc:
                    log.error("volume %s stays marked for removal (the next start finishes "
                              "it): %s", name, exc)
            raise
        log.info("removed volume %s", name)

    def promote_clones(self, dataset: str) -> None:
        """Promote the volumes cloned from snapshots of *dataset*, found in the index (no
        listing of every dataset); after each promote, the datasets whose origin it moved
        are read again (one ``zfs get`` each: the clones of *dataset*, not all volumes)."""
        prefix = self._root + "/"
        for _ in range(1000):   # each promote moves at least one snapshot away from dataset
            children = self._layout.children()
            clones = sorted(child for child, p in children.items()
                            if p.get("origin", "").startswith(dataset + "@")
                            and p.get(OWNER) == "snapvol")
            if not clones:
                return
            self._zfs.promote(prefix + clones[0])
            log.info("promoted %s%s: it no longer depends on %s, which is being removed",
                     prefix, clones[0], dataset)
            # the promoted clone takes over the origin snapshot and those before it: its
            # origin, the old origin's, and those of the other clones of them change
            for child in {dataset.removeprefix(prefix), *clones}:
                self._index.refresh(child)
