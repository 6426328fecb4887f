"""What the scheduler did last for each volume, persisted so a restart keeps the cadence.

One small JSON file in the state directory, replaced atomically after every run (during a
scheduler pass, once a second at most and at its end: :meth:`AutoHistory.batched`). It holds
only what the filesystem cannot tell: when the last automatic run happened and how it ended
(the snapshots themselves are always read from the filesystem).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from .statefile import read_json, write_json_atomically

log = logging.getLogger(__name__)


def _tell(listeners: list[Callable[[str, object], None]], volume: str, run: object) -> None:
    """Call each listener (metrics counting outcomes); one that fails is logged, never
    allowed to fail the run being recorded."""
    for listener in listeners:
        try:
            listener(volume, run)
        except Exception:
            log.exception("a listener of %s records failed", type(run).__name__)


@dataclass(frozen=True)
class AutoRun:
    """One automatic run on one volume: the snapshot it took (or its error) and the pruning.

    *at* is when it ran, *due* the slot of the schedule it ran for (None in records written
    before slots were kept: the run's *at* stands for it); the next slot follows from *due*,
    so the cadence keeps its phase however late a run was."""

    at: datetime
    snapshot: str | None
    error: str | None = None
    pruned: int = 0
    due: datetime | None = None

    @property
    def result(self) -> str:
        return "failed" if self.error else "ok"


class AutoHistory:
    """The last :class:`AutoRun` of every scheduled volume (thread-safe)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._guard = threading.Lock()
        raw = read_json(path, {})
        self._runs: dict[str, AutoRun] = {}
        self._listeners: list[Callable[[str, AutoRun], None]] = []
        self._batches = 0               # open batched() blocks
        self._every = 0.0               # while batched: the longest wait between two saves
        self._saved = time.monotonic()  # of the last save (or of the load)
        self._dirty = False             # recorded since the last save
        for name, entry in raw.items() if isinstance(raw, dict) else ():
            try:
                due = entry.get("due")
                self._runs[name] = AutoRun(datetime.fromisoformat(entry["at"]), entry.get("snapshot"),
                                           entry.get("error"), int(entry.get("pruned", 0)),
                                           datetime.fromisoformat(due) if due else None)
            except (KeyError, TypeError, ValueError):
                continue   # a hand-edited or foreign entry: the volume starts a fresh cadence

    @property
    def path(self) -> Path:
        """The state file."""
        return self._path

    def last(self, volume: str) -> AutoRun | None:
        return self._runs.get(volume)

    def on_record(self, listener: Callable[[str, AutoRun], None]) -> None:
        """Call *listener(volume, run)* after every recorded run (metrics count outcomes)."""
        self._listeners.append(listener)

    def record(self, volume: str, run: AutoRun) -> None:
        """Keep *run* as *volume*'s last; saved at once, or inside :meth:`batched` within
        its *every* seconds."""
        with self._guard:
            self._runs[volume] = run
            self._dirty = True
            if not self._batches or time.monotonic() - self._saved >= self._every:
                self._save()
        _tell(self._listeners, volume, run)  # type: ignore[arg-type]

    @contextmanager
    def batched(self, every: float = 1.0) -> Iterator[None]:
        """Within the block, save at most every *every* seconds, and once at its end.

        Why: the file holds every scheduled volume, so saving it after each of a pass's
        runs costs O(volumes) per run: 1,000 volumes due together rewrote 1,000 entries
        1,000 times, holding the interpreter lock Docker's calls need. A crash inside the
        block loses at most *every* seconds of records: those volumes run once more at the
        next start, the same worst case as the unsynced save's after a power loss."""
        with self._guard:
            self._batches += 1
            self._every = every
        try:
            yield
        finally:
            with self._guard:
                self._batches -= 1
                if self._dirty:
                    self._save()

    def forget(self, volume: str) -> None:
        with self._guard:
            if self._runs.pop(volume, None) is not None:
                self._save()

    def rename(self, volume: str, new_name: str) -> None:
        """The record of *volume* is now *new_name*'s (the trash)."""
        with self._guard:
            if volume in self._runs:
                self._runs[new_name] = self._runs.pop(volume)
                self._save()

    def volumes(self) -> set[str]:
        """The volumes with a recorded run."""
        with self._guard:
            return set(self._runs)

    def _save(self) -> None:
        # Not fsynced: after a power loss the worst case is one extra automatic snapshot.
        # by hand, not asdict (which deep-copies: 0.2 s for 1,000 entries), and on one line
        # (json's C encoder): a scheduler pass of a thousand volumes saves it every second
        data = {name: {"at": run.at.isoformat(), "snapshot": run.snapshot, "error": run.error,
                       "pruned": run.pruned, "due": run.due.isoformat() if run.due else None}
                for name, run in self._runs.items()}
        write_json_atomically(self._path, data, durable=False, indent=None)
        self._saved = time.monotonic()
        self._dirty = False


@dataclass(frozen=True)
class Replication:
    """One replication of a volume to a target: what was sent, from which base, how it ended."""

    target: str
    at: datetime
    snapshot: str | None
    base: str | None = None
    bytes: int = 0
    error: str | None = None
    attempts: int = 1

    @property
    def result(self) -> str:
        return "failed" if self.error else "ok"


class ReplicationLog:
    """Per volume and target: the last replication, and the last one that succeeded (its
    snapshot is the common base of the next incremental stream, protected from pruning)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._guard = threading.Lock()
        raw = read_json(path, {})
        self._entries: dict[str, dict[str, dict[str, Replication]]] = {}
        self._listeners: list[Callable[[str, Replication], None]] = []
        for volume, targets in raw.items() if isinstance(raw, dict) else ():
            for target, kinds in targets.items() if isinstance(targets, dict) else ():
                for kind, entry in kinds.items() if isinstance(kinds, dict) else ():
                    try:
                        entry = {**entry, "at": datetime.fromisoformat(entry["at"])}
                        self._entries.setdefault(volume, {}).setdefault(target, {})[kind] = \
                            Replication(**entry)
                    except (KeyError, TypeError, ValueError):
                        continue

    @property
    def path(self) -> Path:
        """The state file."""
        return self._path

    def on_record(self, listener: Callable[[str, Replication], None]) -> None:
        """Call *listener(volume, run)* after every recorded replication."""
        self._listeners.append(listener)

    def record(self, volume: str, run: Replication) -> None:
        with self._guard:
            kinds = self._entries.setdefault(volume, {}).setdefault(run.target, {})
            kinds["last"] = run
            if run.error is None:
                kinds["ok"] = run
            self._save()
        _tell(self._listeners, volume, run)  # type: ignore[arg-type]

    def records(self, volume: str) -> dict[str, tuple[Replication | None, Replication | None]]:
        """target -> (the last replication of *volume* there, the last that succeeded)."""
        with self._guard:
            return {target: (k.get("last"), k.get("ok"))
                    for target, k in self._entries.get(volume, {}).items()}

    # Readers take the lock too: replications record from other threads, and iterating a
    # dict that grows meanwhile raises RuntimeError.

    def last(self, volume: str) -> Replication | None:
        with self._guard:
            runs = [k["last"] for k in self._entries.get(volume, {}).values() if "last" in k]
        return max(runs, key=lambda r: r.at) if runs else None

    def last_to(self, volume: str, target: str) -> Replication | None:
        """The last replication of *volume* to *target*, failed or not."""
        with self._guard:
            return self._entries.get(volume, {}).get(target, {}).get("last")

    def base(self, volume: str, target: str) -> str | None:
        """The snapshot *target* last received of *volume*."""
        with self._guard:
            ok = self._entries.get(volume, {}).get(target, {}).get("ok")
        return ok.snapshot if ok else None

    def bases(self, volume: str) -> set[str]:
        """Snapshots of *volume* that a target holds as its newest replica: never prune them."""
        return set(self.bases_by_target(volume).values())

    def bases_by_target(self, volume: str) -> dict[str, str]:
        """target -> the snapshot of *volume* it last received."""
        with self._guard:
            return {target: k["ok"].snapshot for target, k in self._entries.get(volume, {}).items()
                    if "ok" in k and k["ok"].snapshot}

    def recorded_bases(self) -> dict[str, dict[str, str]]:
        """volume -> target -> the snapshot that target last received, for every record."""
        with self._guard:
            return {volume: {target: k["ok"].snapshot for target, k in targets.items()
                             if "ok" in k and k["ok"].snapshot}
                    for volume, targets in self._entries.items()}

    def forget_base(self, volume: str, target: str) -> None:
        """Forget which snapshot *target* holds (the next replication asks it again)."""
        with self._guard:
            kinds = self._entries.get(volume, {}).get(target, {})
            if kinds.pop("ok", None) is not None:
                self._save()

    def forget(self, volume: str) -> None:
        with self._guard:
            if self._entries.pop(volume, None) is not None:
                self._save()

    def rename(self, volume: str, new_name: str) -> None:
        """The records of *volume* (its targets and their bases) are now *new_name*'s."""
        with self._guard:
            if volume in self._entries:
                self._entries[new_name] = self._entries.pop(volume)
                self._save()

    def volumes(self) -> set[str]:
        """The volumes with a recorded replication."""
        with self._guard:
            return set(self._entries)

    def _save(self) -> None:
        data = {volume: {target: {kind: {**asdict(run), "at": run.at.isoformat()}
                                  for kind, run in kinds.items()}
                         for target, kinds in targets.items()}
                for volume, targets in self._entries.items()}
        write_json_atomically(self._path, data, durable=True)
