"""The trash: ``docker volume rm`` keeps the volume, with its snapshots, for a while.

A trashed volume is the very same backend volume under an internal name,
``snapvol.trash.<id>`` (:func:`plugin.names.internal_name`): backends never list internal
names and no client may use one, so it is gone from Docker (List, Get) and the name is free
for a new volume that inherits nothing. Its snapshots, options and snapshot holds move with
it (one rename); its records (replication targets and bases, the scheduler's last run, its
standby role) are moved to the internal name and come back on restore. It is kept for
``SNAPVOL_TRASH_TTL``, or until the pool passes ``SNAPVOL_TRASH_FULL`` percent, when the
oldest are purged first; a volume with ``trash=off`` is destroyed at once.

Every change is an intent recorded in the trash's journal (:class:`TrashBook`) before it
touches the storage (``moving``, ``restoring``, ``purging``), so that :meth:`Trash.recover` at start finishes what
a kill interrupted; the backends' renames can be repeated to finish. A trashed volume whose
record is lost (a damaged journal line is skipped) is found again by its internal name
and kept, under an unknown name: ``snapvol trash restore ID --as NAME`` brings it back.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

from . import names
from .backends.base import Backend, VolumeInfo
from .errors import Conflict, InvalidName, PluginError, VolumeExists, VolumeNotFound
from .locks import VolumeLocks
from .trash_book import KIND, Trashed, TrashBook

log = logging.getLogger(__name__)

_ID_LENGTH = 12
# a purge the filesystem refused is not tried again by the scheduler for this long: the
# scheduler passes every 10 s, and one error a pass for a purge that keeps failing is noise
RETRY_REFUSED_AFTER = timedelta(minutes=5)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class TrashedNotFound(PluginError):
    http_status = 404

    def __init__(self, what: str) -> None:
        super().__init__(f"no trashed volume {what}; see snapvol trash ls")


class Records:
    """What is kept about a volume by name outside the backend, moved with it into and out of
    the trash, and forgotten when it is purged (the domain wires these)."""

    def __init__(self) -> None:
        self.renamers: list[Callable[[str, str], None]] = []

    def rename(self, old: str, new: str) -> None:
        for rename in self.renamers:
            rename(old, new)


class Trash:
    """The trash of one backend: put, list, restore, purge, expiry and space pressure."""

    def __init__(self, backend: Backend, locks: VolumeLocks, book: TrashBook, records: Records,
                 *, ttl: int, full_percent: int, destroy: Callable[[str], None],
                 restored: Callable[[str], None], clock: Callable[[], datetime] = utc_now) -> None:
        """*ttl* seconds a volume is kept (0: no trash); from *full_percent* of the pool
        filled, the oldest are purged and nothing new is kept. *destroy* destroys a volume
        by its backend name as Remove does (its clone relations, its records); *restored*
        is told the name of a volume that came back (the domain lists it again)."""
        self._backend = backend
        self._locks = locks
        self._book = book
        self.records = records
        self.ttl = ttl
        self.full_percent = full_percent
        self._destroy = destroy
        self._restored = restored
        self._clock = clock
        self._purge_guard = threading.Lock()
        self._refused_until: dict[str, datetime] = {}     # id -> when tidy tries it again

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    # ------------------------------------------------------------------ queries

    def entries(self) -> list[Trashed]:
        """What the trash holds, oldest first (unfinished intents included)."""
        return self._book.all()

    def holds_any(self) -> bool:
        """Whether anything is in the trash (cheap: no listing)."""
        return len(self._book) > 0

    def __len__(self) -> int:
        """How many volumes the trash holds (cheap: no listing)."""
        return len(self._book)

    def internal_names(self) -> set[str]:
        return {t.internal for t in self._book.all()}

    def describe(self, entry: Trashed) -> dict[str, Any]:
        """One entry as ``snapvol trash ls --json`` shows it."""
        try:
            used = self._backend.usage(entry.internal).used_bytes
            snapshots = len(self._backend.snapshots(entry.internal))
        except PluginError:
            used, snapshots = None, None
        return {"Id": entry.id, "Name": entry.name, "RemovedAt": entry.removed_at.isoformat(),
                "ExpiresAt": entry.expires_at(self.ttl).isoformat() if self.ttl else None,
                "UsedBytes": used, "Snapshots": snapshots, "State": entry.state}

    def fill_percent(self) -> float | None:
        """How full the pool is, in percent (None: unknown)."""
        try:
            capacity = self._backend.capacity()
        except PluginError:
            return None
        if capacity.size_bytes <= 0:
            return None
        return 100.0 * (1 - capacity.available_bytes / capacity.size_bytes)

    def under_pressure(self) -> bool:
        fill = self.fill_percent()
        return fill is not None and fill >= self.full_percent

    def keeps(self, info: VolumeInfo) -> bool:
        """Whether Remove moves volume *info* here rather than destroy it: not with the
        trash off, a ``trash=off`` volume, a pool past the fill threshold (freeing space is
        what that rm is for), or a ZFS clone of another volume's snapshot."""
        if not self.enabled or info.options.get("trash") == "off":
            return False
        if self.under_pressure():
            log.warning("the pool is past %d%% full: volume %s is destroyed, not kept in the "
                        "trash", self.full_percent, info.name)
            return False
        if any(info.name in clones.values() for clones in self._backend.clone_origins().values()):
            # a ZFS clone kept would pin its origin's snapshot: the origin could no longer
            # roll back past it nor remove it, for a volume the user has removed
            log.info("volume %s is a clone of another volume's snapshot (ZFS): destroyed, "
                     "not kept in the trash", info.name)
            return False
        return True

    # ------------------------------------------------------------------ changes

    def put(self, name: str) -> Trashed:
        """Move volume *name* into the trash. Caller: holds *name*'s lock, has checked that
        nothing uses it and that it should be kept (:attr:`enabled`, its ``trash=`` option,
        :meth:`under_pressure`)."""
        entry = Trashed(id=secrets.token_hex(_ID_LENGTH // 2), name=name,
                        removed_at=self._clock().replace(microsecond=0), state="moving")
        self._book.put(entry)                                    # the intent first
        # the internal name's lock too: between the records' rename and the volume's, the
        # records name a volume that does not exist yet, and snapvol check must see it busy
        with self._locks.hold(entry.internal):
            try:
                self._finish(entry)
            except BaseException:
                self._unwind(entry, entry.name, entry.internal)   # Remove failed: nothing moved
                raise
        log.info("volume %s moved to the trash as %s (kept until %s)", name, entry.id,
                 entry.expires_at(self.ttl).isoformat())
        return entry

    def restore(self, key: object, as_name: object = None) -> str:
        """Bring a trashed volume back under its name, or *as_name*; return the name.

        :raises TrashedNotFound: no such entry. :raises VolumeExists: the name is taken
            (give another with *as_name*). :raises InvalidName: a bad *as_name*, or none
            where the name was lost.
        """
        entry = self._find(key)
        target = names.volume_name(as_name) if as_name is not None else entry.name
        if not target:
            raise InvalidName(f"the name trashed volume {entry.id} had is unknown; "
                              "give one with --as NAME")
        names.volume_name(target)
        with self._locks.hold(target, entry.internal):
            entry = self._find(entry.id)
            if entry.state != "trashed":
                raise Conflict(f"trashed volume {entry.id} is busy ({entry.state}); try again")
            if self._exists(target):
                raise VolumeExists(f"volume {target} exists; restore {entry.name or entry.id} "
                                   "under another name with --as NEW")
            entry = replace(entry, state="restoring", restore_as=target)
            self._book.put(entry)
            try:
                self._finish(entry)
            except BaseException:
                self._unwind(entry, entry.internal, target)     # still in the trash
                raise
        log.info("restored volume %s from the trash (%s)%s", target, entry.id,
                 f", it was {entry.name}" if entry.name and entry.name != target else "")
        return target

    def purge(self, key: object) -> Trashed:
        """Destroy one trashed volume for good.

        :raises TrashedNotFound: no such entry.
        """
        entry = self._find(key)
        with self._locks.hold(entry.internal):
            entry = self._find(entry.id)
            purging = replace(entry, state="purging")
            self._book.put(purging)
            try:
                self._finish(purging)
            except BaseException:
                # refused with the volume whole (a promote out of space, a busy dataset):
                # trashed again, listed and purged later; else start-up finishes the intent
                if entry.state == "trashed" and self._exists(entry.internal):
                    self._book.put(entry)
                raise
        return purging

    def purge_all(self) -> list[Trashed]:
        done = []
        for entry in self._book.all():
            try:
                done.append(self.purge(entry.id))
            except TrashedNotFound:
                continue                            # purged meanwhile
        return done

    def tidy(self, now: datetime | None = None) -> list[Trashed]:
        """Purge what expired, then the oldest while the pool is past its fill threshold;
        return what was purged. Called by the scheduler, and before Create and Remove."""
        if not self._purge_guard.acquire(blocking=False):
            return []                                # another thread is at it
        try:
            now = now or self._clock()
            oldest = self._book.oldest()
            if (oldest is None or self.enabled and oldest.expires_at(self.ttl) > now) \
                    and not self.under_pressure():
                return []        # the common case, in constant time: nothing is due
            purged = []
            for entry in self._retryable(now):
                if not self.enabled or entry.expires_at(self.ttl) <= now:
                    log.info("purging %s (volume %s) from the trash: %s", entry.id, entry.name,
                             "expired" if self.enabled else "the trash is off")
                    purged.append(self._purge_quietly(entry))
            while self.under_pressure():
                left = self._pressure_order(self._retryable(now))
                if not left:
                    break
                fill = self.fill_percent()
                log.warning("pool %.0f%% full (threshold %d%%): purging the oldest trashed "
                            "volume %s (%s)", fill or 0, self.full_percent, left[0].id, left[0].name)
                purged.append(self._purge_quietly(left[0]))
                if not self._backend_frees_at_once:
                    break                   # Btrfs frees in the background: measure next time
            return [p for p in purged if p is not None]
        finally:
            self._purge_guard.release()

    def _pressure_order(self, entries: list[Trashed]) -> list[Trashed]:
        """*entries* (oldest first) in the order space pressure purges them: those no
        volume is a clone of first. Destroying a clone origin frees only what its clones do
        not share, and ZFS must promote them first, which a full pool can refuse."""
        origins = set(self._backend.clone_origins()) if entries else set()
        return sorted(entries, key=lambda entry: entry.internal in origins)   # stable

    @property
    def _backend_frees_at_once(self) -> bool:
        return self._backend.kind == "zfs"

    def _retryable(self, now: datetime) -> list[Trashed]:
        """Trashed entries, oldest first, but those whose purge was refused lately."""
        return [e for e in self._book.all()
                if e.state == "trashed" and self._refused_until.get(e.id, now) <= now]

    def _purge_quietly(self, entry: Trashed) -> Trashed | None:
        try:
            purged = self.purge(entry.id)
        except PluginError as exc:
            self._refused_until[entry.id] = self._clock() + RETRY_REFUSED_AFTER
            log.error("could not purge %s (volume %s) from the trash (tried again in %d min): %s",
                      entry.id, entry.name, RETRY_REFUSED_AFTER.seconds // 60, exc)
            return None
        self._refused_until.pop(entry.id, None)
        return purged

    def recover(self) -> None:
        """At start, before serving: finish every interrupted intent, drop records whose
        volume is gone, and keep trashed volumes whose record was lost.

        A move or restore the storage refuses to finish now (a dataset still busy after the
        kill) is undone, not left for later: its Remove or restore was never answered, and
        the volume, still under its old name, is in use again from now on. Finishing it at
        some later start would take it away from under whoever uses it (the torture found
        this). A purge that cannot finish stays an intent: its volume is out of sight."""
        for entry in self._book.all():
            try:
                self._finish(entry)
            except PluginError as exc:
                if entry.state == "moving":
                    log.error("trash: could not finish moving %s into the trash (%s), undone: "
                              "the volume stays; remove it again: %s", entry.name, entry.id, exc)
                    self._unwind(entry, entry.name, entry.internal)
                elif entry.state == "restoring":
                    log.error("trash: could not finish restoring %s as %s, undone: it stays in "
                              "the trash; restore it again: %s", entry.id, entry.restore_as, exc)
                    self._unwind(entry, entry.internal, entry.restore_as)
                else:
                    log.error("trash: could not finish %s of %s (%s): %s", entry.state,
                              entry.id, entry.name, exc)
        known = self.internal_names()
        for info in self._backend.internal_volumes():
            kind, _, token = info.name.removeprefix(names.INTERNAL_PREFIX).partition(".")
            if kind == KIND and info.name not in known and token:
                log.warning("trash: volume %s has no record (trash.json lost?); kept, its "
                            "name unknown: snapvol trash restore %s --as NAME", info.name, token)
                self._book.put(Trashed(id=token, name="", removed_at=self._clock().replace(microsecond=0)))

    # ------------------------------------------------------------------ internals

    def _finish(self, entry: Trashed) -> None:
        """Carry *entry*'s intent out; each step can be repeated after a kill."""
        # the records move first: a kill before the volume follows leaves them under the
        # name the intent ends with, which start-up counts as existing (see recover)
        if entry.state == "moving":
            self.records.rename(entry.name, entry.internal)
            try:
                self._backend.rename_volume(entry.name, entry.internal)
            except VolumeNotFound:
                log.warning("trash: volume %s is gone; dropping its record", entry.name)
                self._book.drop(entry.id)
                return
            self._book.put(replace(entry, state="trashed"))
        elif entry.state == "restoring":
            self.records.rename(entry.internal, entry.restore_as)
            try:
                self._backend.rename_volume(entry.internal, entry.restore_as)
            except VolumeNotFound:
                self._book.drop(entry.id)
                return
            self._book.drop(entry.id)
            self._restored(entry.restore_as)
        elif entry.state == "purging":
            try:
                self._destroy(entry.internal)
            except VolumeNotFound:
                pass
            self._book.drop(entry.id)
            log.info("purged %s (volume %s) from the trash", entry.id, entry.name or "?")
        elif entry.state == "trashed":
            try:
                self._backend.volume(entry.internal)
            except VolumeNotFound:
                log.warning("trash: %s (volume %s) is gone; dropping its record", entry.id, entry.name)
                self._book.drop(entry.id)

    def _unwind(self, entry: Trashed, back_to: str, moved_to: str) -> None:
        """A move that failed midway (a rename refused, a busy dataset) goes back: the
        volume and its records under *back_to* again, the intent forgotten (a move into the
        trash) or the entry trashed again (a restore), as if it never started. If even that
        fails, the intent stays for start-up to finish, and the log says so."""
        try:
            self.records.rename(moved_to, back_to)
            try:
                self._backend.rename_volume(moved_to, back_to)
            except VolumeNotFound:
                pass                                    # neither name: nothing to put back
            if entry.state == "moving":
                self._book.drop(entry.id)
            else:
                self._book.put(replace(entry, state="trashed", restore_as=""))
        except Exception as exc:                    # noqa: BLE001 - the caller raises the cause
            log.error("trash: could not undo the %s of %s (%s); the next start finishes it: %s",
                      entry.state, entry.name or entry.id, entry.id, exc)

    def _find(self, key: object) -> Trashed:
        """An entry by id, or by the name the volume had (the newest of that name)."""
        if not isinstance(key, str) or not key or len(key) > names.MAX_NAME:
            raise InvalidName(f"give a trashed volume's name or id (see snapvol trash ls), "
                              f"not {key!r:.60}")
        entry = self._book.get(key)
        if entry is not None:
            return entry
        named = [t for t in self._book.all() if t.name == key]
        if not named:
            raise TrashedNotFound(key)
        return named[-1]

    def _exists(self, name: str) -> bool:
        try:
            self._backend.volume(name)
            return True
        except VolumeNotFound:
            return False
