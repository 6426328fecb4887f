"""The read-only view of the volumes: Get's ``Status`` for ``docker volume inspect``, the rows
of ``snapvol ls``, and ``snapvol status``.

Takes no lock: a snapshot pruned, sent or received while it looks costs a detail, never the
answer (Docker's Get must not fail because of a concurrent prune).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from . import __version__, names, options
from .backends.base import Backend, SnapshotInfo, VolumeInfo
from .errors import BackendError, BackendUnavailable, PluginError, VolumeNotFound
from .history import ReplicationLog
from .mounts import MountTable
from .schedules import Schedule, Schedules, schedule_of
from .lifecycle import Lifecycle, owner
from .snapshot_names import is_automatic
from .statefile import quarantined
from .units import rfc3339
from .known import KnownVolumes
from .verify_book import VerifyBook, VerifyResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VolumeView:
    """What Docker's Get shows: the volume plus a ``Status`` map for ``docker volume inspect``."""

    name: str
    mountpoint: Path | None
    created: datetime | None
    status: dict[str, Any] = field(default_factory=dict)


class StatusView:
    """What inspect, ``snapvol ls`` and ``snapvol status`` show."""

    def __init__(self, backend: Backend, mounts: MountTable, schedules: Schedules,
                 lifecycle: Lifecycle, known: KnownVolumes, *,
                 replications: ReplicationLog | None = None,
                 state_dirs: frozenset[Path] = frozenset()) -> None:
        """*state_dirs* are where the state files live (their damaged ones are reported)."""
        self._backend = backend
        self._mounts = mounts
        self._schedules = schedules
        self._lifecycle = lifecycle
        self._known = known
        self._replications = replications
        self._state_dirs = state_dirs
        self._started = time.time()
        # set by the standby roles (plugin.standby, above this module): a volume's role
        self.role_of: Callable[[str], dict[str, Any] | None] | None = None
        # set by the domain: the results of validated restores (plugin.verify)
        self.verify_book: VerifyBook | None = None

    def get(self, name: object) -> VolumeView:
        """One volume with its status for ``docker volume inspect`` (no lock).

        Only a volume that really does not exist is an error: dockerd purges its own
        metadata (options, labels) of a volume whose Get fails, so when the storage itself is
        unavailable we still answer, with the problem in ``Status``, for the volumes there
        were (:class:`~plugin.known.KnownVolumes`), and for no other name.

        :raises VolumeNotFound: no such volume (or none known while the storage is down).
        """
        name = names.volume_name(name)
        try:
            info = self._backend.volume(name)
        except VolumeNotFound:
            self._known.discard(name)
            role = self.role_of(name) if self.role_of is not None else None
            if role is not None and role["role"] == "standby":
                # a standby whose first sync has not come yet: Docker must know the name
                # (else it creates an empty volume of it), and a Mount asks for a hand-off
                return VolumeView(name, None, None, {"role": role, "state": "a standby "
                                                     "awaiting its first sync"})
            raise
        except (BackendUnavailable, BackendError) as exc:
            if name not in self._known:
                raise VolumeNotFound(name) from None
            log.warning("get %s: answering without details: %s", name, exc)
            return VolumeView(name, None, None, {"state": "unavailable", "error": str(exc)})
        self._known.add(name)
        try:
            status = self.status(info)
        except VolumeNotFound:
            self._known.discard(name)
            raise                                   # removed since: really gone
        except (PluginError, OSError) as exc:
            # A snapshot pruned, sent or received while we looked: the volume is there, only
            # its details are not, for now.
            log.warning("get %s: answering without all details: %s", name, exc)
            status = self._without_details(info, exc)
        return VolumeView(info.name, info.mountpoint, info.created, status)

    def snapshots(self, volume: object) -> list[dict[str, Any]]:
        """``snapvol snapshot ls``: the volume's snapshots, oldest first, each with its owner
        and, when something needs it, what (``kept_for``; see :mod:`plugin.lifecycle`).

        :raises VolumeNotFound: no such volume.
        """
        volume = names.volume_name(volume)
        listed = self._backend.snapshots(volume)
        needed = self._lifecycle.needs(volume)
        passed = self.verify_book.passed(volume) if self.verify_book is not None else None
        return [{**snapshot_row(s), "kept_for": needed.get(s.name),
                 "verified": rfc3339(passed.started) if passed is not None
                 and passed.snapshot == s.name else None} for s in listed]

    def describe_volumes(self) -> list[dict[str, Any]]:
        """Every volume with usage and mount count, for ``snapvol ls``; a volume whose details
        fail is listed with the ``error`` (only one removed meanwhile is left out)."""
        in_use = self._mounts.in_use()
        rows = []
        for info in sorted(self._backend.volumes(), key=lambda v: v.name):
            try:
                status = self.status(info, in_use)
            except VolumeNotFound:
                continue                            # removed while listing
            except (PluginError, OSError) as exc:
                log.warning("ls: %s without all details: %s", info.name, exc)
                status = {**self._without_details(info, exc), "mounts": in_use.get(info.name, 0)}
            rows.append({"name": info.name, "created": rfc3339(info.created),
                         "mountpoint": str(info.mountpoint), **status})
        return rows

    def _without_details(self, info: VolumeInfo, exc: Exception) -> dict[str, Any]:
        """The Status of a volume that is there but whose details failed (a snapshot pruned,
        sent or received while we looked, or the filesystem refusing)."""
        return {"backend": self._backend.kind, "options": dict(info.options),
                "error": f"details unavailable for now: {exc}"}

    def describe(self) -> dict[str, Any]:
        """Facts about the plugin process and its storage, for ``snapvol status``."""
        in_use = self._mounts.in_use()
        volumes = self._backend.volumes()
        return {"version": __version__, "pid": os.getpid(),
                "uptime_seconds": round(time.time() - self._started),
                "backend": self._backend.kind, "storage": self._backend.describe(),
                "atomic_multi_volume_snapshots": self._backend.atomic_snapshots,
                "volumes": len(volumes), "volumes_in_use": len(in_use),
                "mounts": sum(in_use.values()), "options": options.accepted(self._backend.kind),
                "damaged_state_files": [str(p) for p in quarantined(*self._state_dirs)],
                "verifications": {name: _verify_row(self.verify_book.last(name))
                                  for name in sorted(self.verify_book.volumes())
                                  if not names.is_internal(name)
                                  and self.verify_book.last(name) is not None}
                if self.verify_book is not None else {}}

    def status(self, info: VolumeInfo, in_use: dict[str, int] | None = None) -> dict[str, Any]:
        usage = self._backend.usage(info.name)
        if in_use is None:
            mounts = len(self._mounts.users(info.name))
        else:
            mounts = in_use.get(info.name, 0)
        listed = self._backend.snapshots(info.name)
        snapshots = [{"name": s.name, "created": rfc3339(s.created),
                      "automatic": is_automatic(s.name), "owner": owner(s.name)} for s in listed]
        status = {"backend": self._backend.kind, "options": dict(info.options),
                  "used_bytes": usage.used_bytes, "quota_bytes": usage.quota_bytes,
                  "mounts": mounts, "snapshots": snapshots}
        replication = self._replications.last(info.name) if self._replications else None
        if replication is not None:
            status["replication"] = {
                "target": replication.target, "snapshot": replication.snapshot,
                "base": replication.base, "at": rfc3339(replication.at), "bytes": replication.bytes,
                "result": replication.result, "error": replication.error}
        role = self.role_of(info.name) if self.role_of is not None else None
        if role is not None:
            status["role"] = role
        verified = self.verify_book.last(info.name) if self.verify_book is not None else None
        if verified is not None or "verify" in info.options:
            passed = self.verify_book.passed(info.name) if self.verify_book is not None else None
            status["verify"] = {"every": info.options.get("verify"),
                                "last": _verify_row(verified),
                                "passed": _verify_row(passed)}
        schedule = schedule_of(info)
        if schedule is not None:
            last = self._schedules.last_run(info.name, listed)
            plan = Schedule(info.name, *schedule, info.created, last)
            status["schedule"] = {
                "every": info.options["schedule"], "keep": str(schedule[1]),
                "quiesce": schedule[2], "next": rfc3339(plan.next_run),
                "last": None if last is None else {
                    "at": rfc3339(last.at), "snapshot": last.snapshot, "result": last.result,
                    "error": last.error, "pruned": last.pruned}}
        return status


def snapshot_row(info: SnapshotInfo) -> dict[str, Any]:
    """A snapshot as the CLI's endpoints show it."""
    return {"volume": info.volume, "name": info.name, "created": rfc3339(info.created),
            "identity": info.identity, "received": info.received, "owner": owner(info.name)}


def _verify_row(result: VerifyResult | None) -> dict[str, Any] | None:
    """A verification as Status and ``snapvol status`` show it."""
    if result is None:
        return None
    return {"result": result.result, "snapshot": result.snapshot,
            "started": rfc3339(result.started), "seconds": result.seconds,
            "message": result.message[-1000:]}
