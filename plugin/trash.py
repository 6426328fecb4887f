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

import heapq
import json
import logging
import os
import secrets
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from . import names
from .backends.base import Backend, VolumeInfo
from .errors import Conflict, InvalidName, PluginError, VolumeExists, VolumeNotFound
from .locks import VolumeLocks
from .statefile import copy_aside, read_json

log = logging.getLogger(__name__)

KIND = "trash"
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


@dataclass(frozen=True, slots=True)     # thousands of them can be kept
class Trashed:
    """One volume in the trash."""

    id: str
    name: str                       # the name it had ("" when its record was lost)
    removed_at: datetime
    state: str = "trashed"          # or an unfinished intent: moving, restoring, purging
    restore_as: str = ""

    @property
    def internal(self) -> str:
        """Its name in the backend."""
        return names.internal_name(KIND, self.id)

    def expires_at(self, ttl: int) -> datetime:
        return self.removed_at + timedelta(seconds=ttl)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "removed_at": self.removed_at.isoformat()}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Trashed:
        return cls(id=str(raw["id"]), name=str(raw.get("name", "")),
                   removed_at=datetime.fromisoformat(raw["removed_at"]),
                   state=str(raw.get("state", "trashed")),
                   restore_as=str(raw.get("restore_as", "")))


class TrashBook:
    """The trashed volumes by id, kept in an append-only journal, each change made durable
    before it counts (``trash.journal`` beside the other state files).

    Each change is one line appended and fdatasync'd: ``{"put": ENTRY}`` or ``{"drop": ID}``;
    reading the journal from the top gives the entries. A change costs the same at 10 or
    10,000 entries; the whole ``trash.json`` it replaces was rewritten (and fsync'd) twice per
    ``docker volume rm``, 558 KB at 3,600 entries, which made removing 10,000 volumes run at
    4 a second (issue 17). When dead lines outnumber the live entries the journal is
    compacted: written anew beside, fsync'd, renamed over (atomic), so its size stays within
    twice the live entries and each change stays O(1) amortized.

    Crash safety: a kill at any moment leaves every complete line, and at worst one last
    line cut short. That change had not been made durable, so nothing acted on it yet: an
    intent is written before the storage is touched, and each step after it can be repeated
    (:meth:`Trash._finish`), so start-up carries on from the line before, as after a kill
    just before the write. The torn line is ignored, and cut off at open so that the next
    line starts clean. A damaged line anywhere else (disk
    trouble, a hand edit) is skipped with an error, the journal copied aside as
    ``trash.journal.corrupt-<time>`` (``snapvol status`` lists it), and :meth:`Trash.recover`
    finds a volume whose record was lost by its internal name, as before.

    Migration: a ``trash.json`` from an earlier snapvol (one JSON object by id, written whole
    and atomically) is read once when there is no journal yet, written out as a journal, and
    then removed; a kill in between leaves both, and the journal, already complete, wins.
    """

    LEGACY = "trash.json"
    # compact when there are more lines than this and more than twice the live entries
    COMPACT_AFTER = 1024

    def __init__(self, path: Path) -> None:
        self._path = path
        self._guard = threading.Lock()
        self._entries: dict[str, Trashed] = {}
        # (removed_at, id) of every entry put, for the oldest in O(log n); a pair whose entry
        # was dropped or replaced since is popped when it reaches the top (see oldest)
        self._by_age: list[tuple[datetime, str]] = []
        self._lines = 0                     # lines in the journal, live or dead
        self._fd: int | None = None
        legacy = path.with_name(self.LEGACY)
        if path.exists():
            self._load()
            if legacy.exists():
                log.warning("%s: removing %s, left by a migration a kill interrupted (the "
                            "journal was complete)", path, legacy)
                _unlink_durably(legacy)
        elif legacy.exists():
            self._migrate(legacy)

    @property
    def path(self) -> Path:
        return self._path

    def __len__(self) -> int:
        return len(self._entries)

    def all(self) -> list[Trashed]:
        """Oldest first."""
        with self._guard:
            return sorted(self._entries.values(), key=lambda t: (t.removed_at, t.id))

    def get(self, trash_id: str) -> Trashed | None:
        with self._guard:
            return self._entries.get(trash_id)

    def oldest(self) -> Trashed | None:
        """The entry removed first (any state), without sorting them all: the trash's
        expiry check runs before every Create, which must not grow with the trash."""
        with self._guard:
            while self._by_age:
                removed_at, trash_id = self._by_age[0]
                entry = self._entries.get(trash_id)
                if entry is not None and entry.removed_at == removed_at:
                    return entry
                heapq.heappop(self._by_age)
            return None

    def _adopt(self, entry: Trashed) -> None:
        self._entries[entry.id] = entry
        heapq.heappush(self._by_age, (entry.removed_at, entry.id))
        if len(self._by_age) > 2 * len(self._entries) + 64:     # mostly stale pairs
            self._by_age = [(e.removed_at, e.id) for e in self._entries.values()]
            heapq.heapify(self._by_age)

    def put(self, entry: Trashed) -> None:
        """Record *entry* (new, or replacing the one of its id), durably.

        :raises OSError: it could not be written; nothing changed.
        """
        with self._guard:
            self._append({"put": entry.to_json()})
            self._adopt(entry)
            self._compact_if_worth_it()

    def drop(self, trash_id: str) -> None:
        with self._guard:
            if trash_id in self._entries:
                self._append({"drop": trash_id})
                del self._entries[trash_id]
                self._compact_if_worth_it()

    def close(self) -> None:
        with self._guard:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    # ------------------------------------------------------------------ the journal

    def _load(self) -> None:
        raw = self._path.read_bytes()
        lines = raw.split(b"\n")
        torn = lines.pop()              # b"" when the journal ends with a newline
        damaged = 0
        for number, line in enumerate(lines, 1):
            try:
                self._apply(json.loads(line))
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                damaged += 1
                log.error("%s: line %d is damaged (%s); skipped: a trashed volume whose record "
                          "is lost is found again by its name", self._path, number, exc)
        self._lines = len(lines)
        if torn:
            log.warning("%s: ignoring an incomplete last line (a kill while it was written: "
                        "that change never happened)", self._path)
        if damaged:
            aside = copy_aside(self._path)
            log.error("%s: a copy as found is kept as %s", self._path, aside.name)
        if torn or damaged:
            self._compact()             # a clean journal: the next line starts on its own

    def _apply(self, record: dict[str, Any]) -> None:
        if "put" in record:
            self._adopt(Trashed.from_json(record["put"]))
        elif "drop" in record:
            self._entries.pop(str(record["drop"]), None)
        else:
            raise ValueError(f"neither put nor drop: {sorted(record)[:3]}")

    def _migrate(self, legacy: Path) -> None:
        raw = read_json(legacy, {})             # a damaged one is moved aside, as before
        for key, value in (raw.items() if isinstance(raw, dict) else ()):
            try:
                self._adopt(Trashed.from_json(value))
            except (KeyError, TypeError, ValueError) as exc:
                log.error("%s: dropping the unreadable record %r (%s); its volume, if any, "
                          "is found again by its name", legacy, key, exc)
        self._compact()                         # the journal first, complete and durable...
        if legacy.exists():
            _unlink_durably(legacy)             # ...then the old file goes
        log.info("trash: %d entr%s moved from %s to %s", len(self._entries),
                 "y" if len(self._entries) == 1 else "ies", legacy.name, self._path.name)

    def _append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()
        if self._fd is None:
            created = not self._path.exists()
            self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               0o600)
            if created:
                _fsync_directory(self._path.parent)
        size = os.fstat(self._fd).st_size
        try:
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(f"short write to {self._path} ({written} of {len(line)} bytes)")
            os.fdatasync(self._fd)
        except BaseException:
            # what was written must not count, nor spoil the next line (a full disk)
            try:
                os.ftruncate(self._fd, size)
            except OSError:
                pass
            raise
        self._lines += 1

    def _compact_if_worth_it(self) -> None:
        if self._lines > self.COMPACT_AFTER and self._lines > 2 * len(self._entries):
            self._compact()

    def _compact(self) -> None:
        """Write the live entries as a new journal and rename it over the old one."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        fd, tmp = tempfile.mkstemp(dir=self._path.parent, prefix=f".{self._path.name}.",
                                   suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                for entry in self._entries.values():
                    f.write((json.dumps({"put": entry.to_json()}, sort_keys=True,
                                        separators=(",", ":")) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        _fsync_directory(self._path.parent)
        self._lines = len(self._entries)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_durably(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        return
    _fsync_directory(path.parent)


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
        volume is gone, and keep trashed volumes whose record was lost."""
        for entry in self._book.all():
            try:
                self._finish(entry)
            except PluginError as exc:
                log.error("trash: could not finish %s of %s (%s): %s", entry.state, entry.id,
                          entry.name, exc)
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
