"""An in-memory index of the datasets directly below snapvol's parent dataset, and the
rule that keeps it from ever serving one that is gone.

Why: each ``zfs`` process costs milliseconds (about 6 ms on zfs-fuse, more under load), and
Docker asks Get, Path and List often; Remove used to list every dataset to find clones
(issue 17). The index answers those from memory.

The contract:

* It is built by one ``zfs get -H -p -r -d 1`` (one process for every child and every
  property the backend lists by) at start, and kept current by the backend's own
  operations, which report what they changed (:meth:`ZfsIndex.refresh` of the datasets an
  operation touched, one ``zfs get`` of those, or :meth:`ZfsIndex.forget`), and re-synced
  in full when :meth:`ZfsIndex.invalidate` says something unknown changed.
* It never serves a dataset that no longer exists. Before a dataset is served by name
  (:meth:`ZfsIndex.props`) or listed (:meth:`ZfsIndex.alive`), its existence is proven:
  a volume is mounted at its own mount point while it exists (snapvol mounts it at create
  and keeps it mounted), and the kernel's mount table, which names the dataset mounted at
  each point, is re-read only when the kernel says it changed (``poll`` on
  ``/proc/self/mountinfo`` reports any mount or unmount in this namespace; one syscall when
  nothing changed). A ``zfs destroy`` unmounts first, and a ``zfs rename`` either remounts
  (OpenZFS: the mount table then names the new dataset) or is refused while mounted
  (zfs-fuse: "dataset is busy", so it needs an unmount first): either way the mount table
  stops vouching for the old name. Where the mount table cannot prove it (the dataset is
  not mounted), ``lzc_exists`` (one ioctl, OpenZFS) or one ``zfs get`` of that dataset
  (zfs-fuse; of all such datasets at once for a listing, :meth:`ZfsIndex.confirm`) decides,
  and a dataset found gone is dropped.
* It sees datasets made behind its back: a name it does not hold is looked up with one
  ``zfs get`` (and, found, added); a dataset of the parent mounted below the mount
  directory that it does not hold, or one found gone, marks it stale, and a stale index
  re-syncs in full at the next read of the whole (:meth:`ZfsIndex.children`). An index older
  than :data:`MAX_AGE` asked for a listing (:meth:`ZfsIndex.children` with *fresh*) answers
  at once and re-syncs in a thread of its own, which bounds how long a dataset made
  unmounted behind its back stays unlisted, without making one List in so many pay for a
  listing of every dataset (3 s on zfs-fuse at 1,000).

Snapshots: OpenZFS gives each mounted dataset's ``.zfs/snapshot`` directory the time of the
last snapshot made, destroyed or renamed on it (``dd_snap_cmtime``, as mtime and ctime, in
nanoseconds; also reset when the dataset is loaded again), so a snapshot listing read after
one ``stat`` of it stays good while that stat does not change (:meth:`ZfsIndex.snapshot_stamp`;
the listing itself is cached by the layout). zfs-fuse has no ``.zfs`` directory and no other
cheap sign, so there every snapshot listing is one ``zfs get``.

Thread safety: readers take a reference to the current mapping, which is never changed in
place (copy on write); changes and syncs are serialised by one lock, so a change reported
while a sync runs is applied after it, never lost under it.
"""

from __future__ import annotations

import logging
import os
import re
import select
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path

from .zfs_commands import ZfsCommands

log = logging.getLogger(__name__)

MAX_AGE = 10.0          # seconds: a listing older than this is re-synced before it is served
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")  # mountinfo writes ' ' as \040


def _unescape(field: str) -> str:
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


class MountTable:
    """Which dataset is mounted at each directory directly below *base*, from
    ``/proc/self/mountinfo``, re-read only after the kernel reported a change of the mount
    table (``POLLPRI`` on an open mountinfo; the report is consumed by the poll)."""

    def __init__(self, base: Path, path: str = "/proc/self/mountinfo") -> None:
        self._base = os.path.realpath(base)
        self._path = path
        self._lock = threading.Lock()
        self._fd = -1
        self._closer: weakref.finalize | None = None
        self._poll: select.poll | None = None
        self._pid = -1
        self._sources: dict[str, str] = {}

    def sources(self) -> dict[str, str]:
        """Mount point (real path) -> what is mounted there (the dataset, for ZFS), for the
        mount points directly below the base; the last mount on a point wins."""
        with self._lock:
            if self._changed():
                self._sources = self._read()
            return self._sources

    def _changed(self) -> bool:
        if self._pid != os.getpid():          # a fork shares the open file's poll state
            if self._closer is not None:
                self._closer()
            # kept open: its poll state is the signal; closed when this table is collected
            self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
            self._closer = weakref.finalize(self, os.close, self._fd)
            self._poll = select.poll()
            self._poll.register(self._fd, select.POLLPRI | select.POLLERR)
            self._pid = os.getpid()
            return True
        assert self._poll is not None
        return bool(self._poll.poll(0))

    def _read(self) -> dict[str, str]:
        os.lseek(self._fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(self._fd, 1 << 16):
            chunks.append(chunk)
        found = {}
        prefix = self._base + "/"
        for raw in b"".join(chunks).decode("utf-8", "replace").splitlines():
            fields = raw.split()
            if len(fields) < 5 or not fields[4].startswith(prefix):
                continue
            point = _unescape(fields[4])
            if "/" in point[len(prefix):]:
                continue
            after = fields.index("-")
            found[point] = _unescape(fields[after + 2]) if len(fields) > after + 2 else ""
        return found


class ZfsIndex:
    """The children of dataset *root* with their *props* (as ``zfs get -p`` gives them),
    mounted below *mount_base* (each child ``c`` at ``mount_base/c``); *exists* is
    ``lzc_exists`` taking a name in bytes, or ``None`` (zfs-fuse)."""

    def __init__(self, zfs: ZfsCommands, root: str, mount_base: Path, props: list[str],
                 exists: Callable[[bytes], bool] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._zfs = zfs
        self.root = root
        self._prefix = root + "/"
        self._base = os.path.realpath(mount_base)
        self._props = props
        self._exists = exists
        self._clock = clock
        self._lock = threading.RLock()
        self._children: dict[str, dict[str, str]] | None = None   # None: never synced
        self._synced_at = 0.0
        self._stale = True
        self.mounts = MountTable(mount_base)
        self.syncs = 0            # how many full syncs: for tests and the log
        self._behind: threading.Thread | None = None
        self._behind_lock = threading.Lock()

    # ------------------------------------------------------------------ whole

    def sync(self) -> dict[str, dict[str, str]]:
        """Re-read every child in one ``zfs get``.

        :raises CommandFailed: the listing failed (the parent is gone, ZFS is down).
        """
        with self._lock:
            found = self._zfs.get_with_children(self.root, ["type", *self._props])
            children = {d[len(self._prefix):]: p for d, p in found.items()
                        if d.startswith(self._prefix) and "/" not in d[len(self._prefix):]
                        and "@" not in d and p.get("type") == "filesystem"}
            self.mounts.sources()     # what is mounted now is what this listing saw
            self._children, self._synced_at, self._stale = children, self._clock(), False
            self.syncs += 1
            log.debug("zfs index: %d datasets below %s", len(children), self.root)
            return children

    def invalidate(self) -> None:
        """Something changed that the caller cannot name: re-sync before the next listing."""
        self._stale = True

    def children(self, *, fresh: bool = False) -> dict[str, dict[str, str]]:
        """Child name -> properties; re-synced first if never synced, stale, or a dataset
        is mounted below the mount directory that the index does not hold; with *fresh*
        (listings served to clients) and older than :data:`MAX_AGE`, re-synced in the
        background for the next call. The entries are not each proven to exist: see
        :meth:`alive`."""
        children = self._children
        if children is None or self._stale or self._unknown_mounted(children):
            return self.sync()
        if fresh and self._clock() - self._synced_at > MAX_AGE:
            self._sync_behind()
        return children

    def settle(self, timeout: float | None = None) -> None:
        """Wait for a re-sync started in the background (tests; an orderly stop)."""
        behind = self._behind
        if behind is not None:
            behind.join(timeout)

    def _sync_behind(self) -> None:
        with self._behind_lock:
            if self._behind is not None and self._behind.is_alive():
                return
            self._behind = threading.Thread(target=self._sync_quietly, daemon=True,
                                            name=f"zfs-index-sync {self.root}")
            self._behind.start()

    def _sync_quietly(self) -> None:
        try:
            self.sync()
        except Exception as exc:            # the next listing tries again; never a crash
            log.warning("zfs index: re-sync of %s failed: %s", self.root, exc)

    def alive(self, child: str, sources: Mapping[str, str] | None = None) -> bool | None:
        """Whether *child* exists, when that is cheap to tell: the mount table (*sources*,
        when the caller has just read it for many) names it at its mount point, or
        ``lzc_exists`` answers; ``None`` when only a ``zfs`` process could tell (not
        mounted, zfs-fuse)."""
        if sources is None:
            sources = self.mounts.sources()
        if sources.get(self._mountpoint(child)) == self._prefix + child:
            return True
        if self._exists is not None:
            try:
                return bool(self._exists((self._prefix + child).encode()))
            except Exception as exc:                # pyzfs's own error tree
                log.warning("lzc_exists %s%s failed: %s", self._prefix, child, exc)
        return None

    def confirm(self, children: list[str]) -> set[str]:
        """Which of *children* exist, in one ``zfs get`` of them alone (for those
        :meth:`alive` could not vouch for: not mounted, on zfs-fuse); the others are
        forgotten, as gone behind our back."""
        found = self._zfs.existing([self._prefix + c for c in children])
        here = {c for c in children if self._prefix + c in found}
        for child in children:
            if child not in here:
                self.forget(child, behind_our_back=True)
        return here

    # ------------------------------------------------------------------ one

    def props(self, child: str) -> dict[str, str] | None:
        """The properties of *child*, proven to exist (see the module's contract), or
        ``None`` if it does not exist. At most one ``zfs get`` (none for a mounted one)."""
        held = (self._children or {}).get(child)
        if held is not None:
            alive = self.alive(child)
            if alive:
                return held
            if alive is False:
                self.forget(child, behind_our_back=True)
                return None
        return self.refresh(child, ours=False)

    def refresh(self, child: str, *, ours: bool = True) -> dict[str, str] | None:
        """Re-read *child* (one ``zfs get``) after the caller changed it (*ours*), or to find
        out whether it exists (not *ours*: a difference is then news of a change behind our
        back, and the rest is re-synced at the next listing). Returns its properties, or
        ``None`` when it does not exist."""
        with self._lock:
            props = self._zfs.get(self._prefix + child, ["type", *self._props], missing_ok=True)
            children = self._children
            held = children is not None and child in children
            if props is None or props.get("type") != "filesystem":
                if held:
                    self._replace({k: v for k, v in children.items() if k != child})
                    if not ours:
                        self._gone_behind_our_back(child)
                return None
            if children is not None and (not held or children[child] != props):
                if not held and not ours:
                    log.info("zfs index: %s%s was made without snapvol; re-syncing at the "
                             "next listing", self._prefix, child)
                    self._stale = True
                self._replace({**children, child: props})
            return props

    def note(self, child: str, prop: str, value: str) -> None:
        """The caller set *prop* of *child* to *value* (no ``zfs`` call)."""
        with self._lock:
            children = self._children
            if children is not None and child in children:
                self._replace({**children, child: {**children[child], prop: value}})

    def forget(self, child: str, *, behind_our_back: bool = False) -> None:
        """*child* is gone (the caller destroyed or renamed it, or it was found gone)."""
        with self._lock:
            children = self._children
            if children is not None and child in children:
                self._replace({k: v for k, v in children.items() if k != child})
            if behind_our_back:
                self._gone_behind_our_back(child)

    def snapshot_stamp(self, child: str) -> tuple[int, int, int, int] | None:
        """A value that changes whenever a snapshot of *child* is made, destroyed or renamed:
        the stat of its ``.zfs/snapshot`` directory (OpenZFS, mounted); ``None`` when there
        is no such sign (zfs-fuse, not mounted), and the snapshots must be read."""
        if self._exists is None:                     # zfs-fuse: no .zfs directory at all
            return None
        mountpoint = self._mountpoint(child)
        if self.mounts.sources().get(mountpoint) != self._prefix + child:
            return None
        try:
            st = os.stat(f"{mountpoint}/.zfs/snapshot")
        except OSError:
            return None
        return (st.st_dev, st.st_mtime_ns, st.st_ctime_ns, st.st_size)

    # ------------------------------------------------------------------ inside

    def _replace(self, children: dict[str, dict[str, str]]) -> None:
        self._children = children          # one reference swap: readers see old or new

    def _gone_behind_our_back(self, child: str) -> None:
        log.warning("zfs index: %s%s is gone, not by snapvol; re-syncing at the next listing",
                    self._prefix, child)
        self._stale = True

    def _mountpoint(self, child: str) -> str:
        return f"{self._base}/{child}"      # as Layout.mountpoint, for names we hold

    def _unknown_mounted(self, children: Mapping[str, dict[str, str]]) -> bool:
        """A dataset of ours is mounted below the mount directory that the index does not
        hold (made, renamed or mounted behind its back)."""
        for source in self.mounts.sources().values():
            child = source[len(self._prefix):]
            # deeper datasets are not the index's (nor volumes): they must not re-sync it
            if source.startswith(self._prefix) and "/" not in child and child not in children:
                return True
        return False
