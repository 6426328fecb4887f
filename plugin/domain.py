"""The domain, assembled: one object holding the services the HTTP layer, the scheduler and
replication call, all sharing one backend, mount table, set of locks and in-flight registry.

Each service is a module of its own (dependencies point down the list):

    lifecycle  whose each snapshot is, and when it may go
    volumes    Docker's lifecycle (Create ... Unmount) and snapshots
    transfers  send / receive
    schedules  automatic snapshots and retention
    trash      what Remove keeps, restore and purge
    verify     validated restores: a check container on a clone of a snapshot
    status     what inspect, ``snapvol ls`` and ``snapvol status`` show
    check      ``snapvol check [--repair]``
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .backends.base import Backend
from .check import Checker
from .history import AutoHistory, ReplicationLog
from .inflight import InFlight
from .lifecycle import Lifecycle
from .locks import VolumeLocks
from .mounts import MountTable
from .quiesce import DockerQuiescer
from .schedules import Schedules
from .status import StatusView
from .transfers import Transfers
from .trash import Records, Trash
from .trash_book import TrashBook
from .verify import Checks, Verifier
from .verify_book import VerifyBook
from .volumes import VolumeService


@dataclass(frozen=True)
class Domain:
    backend: Backend
    mounts: MountTable
    locks: VolumeLocks
    inflight: InFlight
    lifecycle: Lifecycle
    volumes: VolumeService
    transfers: Transfers
    schedules: Schedules
    status: StatusView
    checker: Checker
    replications: ReplicationLog | None
    trash: Trash | None = None
    verifier: Verifier | None = None

    @classmethod
    def assemble(cls, backend: Backend, mounts: MountTable, locks: VolumeLocks, *,
                 recover: Callable[[], object] | None = None,
                 history: AutoHistory | None = None, quiescer: DockerQuiescer | None = None,
                 replications: ReplicationLog | None = None, transfers: int = 4,
                 trash: TrashBook | None = None, trash_ttl: int = 0,
                 trash_full: int = 90, verify_book: VerifyBook | None = None,
                 checks: Checks | None = None, verify_refusal: str | None = None) -> Domain:
        """Wire the services. *recover* makes the storage reachable again (Mount calls it
        when the backend reports it unavailable); *history* keeps the scheduler's last runs;
        *quiescer* reaches Docker to pause containers (without one, ``quiesce=pause`` is
        refused); *replications* records replications (their bases are never pruned); at
        most *transfers* streams run at once; with *trash*, Remove keeps a volume for
        *trash_ttl* seconds (0: it destroys) unless the pool is *trash_full* percent full;
        with *verify_book*, validated restores are recorded there and run by *checks*
        (refused with *verify_refusal* if given). Nothing is opened: call ``volumes.open()``."""
        inflight = InFlight(locks, transfers)
        state_dirs = frozenset(s.path.parent for s in (mounts, history, replications)
                               if s is not None)
        lifecycle = Lifecycle(backend, locks, inflight, replications)
        volumes = VolumeService(backend, mounts, locks, inflight, lifecycle, recover=recover,
                                history=history, quiescer=quiescer, replications=replications)
        schedules = Schedules(volumes, backend, locks, lifecycle, history=history)
        trash_service = None
        if trash is not None:
            records = Records()
            records.renamers += [store.rename for store in (history, replications)
                                 if store is not None]
            trash_service = volumes.trash = Trash(backend, locks, trash, records, ttl=trash_ttl,
                                         full_percent=trash_full,
                                         destroy=volumes.destroy_trashed,
                                         restored=volumes.restored)
        verifier = None
        if verify_book is not None:
            verifier = Verifier(backend, locks, inflight, verify_book, checks,
                                refusal=verify_refusal)
            lifecycle.verified = _newest_passed(verify_book)
            volumes.on_remove(verify_book.forget)
            if trash_service is not None:
                trash_service.records.renamers.append(verify_book.rename)
        status = StatusView(backend, mounts, schedules, lifecycle, volumes.known,
                            replications=replications, state_dirs=state_dirs)
        status.verify_book = verify_book
        return cls(backend=backend, mounts=mounts, locks=locks, inflight=inflight,
                   lifecycle=lifecycle, volumes=volumes,
                   transfers=Transfers(volumes, backend, mounts, locks, inflight, lifecycle,
                                       replications),
                   schedules=schedules,
                   status=status,
                   checker=Checker(backend, mounts, locks, inflight, lifecycle,
                                   replications=replications, quiescer=quiescer,
                                   state_dirs=state_dirs),
                   replications=replications, trash=trash_service, verifier=verifier)


def _newest_passed(book: VerifyBook) -> Callable[[str], str | None]:
    def newest(volume: str) -> str | None:
        passed = book.passed(volume)
        return passed.snapshot if passed is not None else None
    return newest
