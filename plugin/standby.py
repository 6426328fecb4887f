"""Standby replicas: a volume whose snapshots follow to other snapvol hosts, which can take
it over — planned (hand-off) or after losing the primary (promote).

Roles (:mod:`plugin.roles`): on each host a volume is a *primary* (served to Docker; its
snapshots are synced to its standbys every ``sync``) or a *standby* (kept up to date by its
primary's syncs; Mount refused, never stale data served). An *epoch* orders the primaries:
every sync carries the sender's, a hand-off or a promote raises it, and a host that meets a
higher epoch than its own stops being primary. So two primaries can never both go on
writing once they can talk to each other: the stale one finds out at its next sync, at its
next Mount (it asks its standbys), or when the new primary's sync reaches it.

This module: creating a volume with standbys, syncing them (the primary side), admitting
syncs (the standby side), and Mount (a standby asks its primary for a hand-off; a primary
checks nobody has a newer epoch). The moves of the primary role themselves — hand-off,
promote, standing down — are in :mod:`plugin.handoff`, mixed into :class:`Standbys`.

Hand-off (run on the primary; a Mount on a standby asks its primary for one): fence (no new
Mount), wait for the last container to unmount, send a final snapshot, tell the standby to
become primary at epoch+1, then become its standby. Every step is persisted before the next,
so a kill anywhere leaves either the old primary (fenced only while the outcome is unknown:
it asks the standby, and stays fenced, saying so, while it cannot) or the new one — never two.

Promote (run on a standby whose primary is lost) serves the last synced snapshot; what the
primary wrote after it is not here, and the answer says how old it is. When the old primary
comes back it meets the higher epoch and stands down: its volume, which may hold writes the
new primary never saw, is renamed aside (``NAME-diverged-eN``, an ordinary volume with all
its snapshots, never destroyed), and the new primary's next sync seeds it again as a standby.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from . import names
from .backends.base import Backend
from .errors import Conflict, PluginError, TransferFailed, VolumeNotFound
from .handoff import RoleChanges
from .history import Replication, ReplicationLog
from .locks import VolumeLocks
from .mounts import MountTable
from .replication import Replicator
from .roles import PRIMARY, STANDBY, Role, RoleBook
from .standby_common import describe_role, epoch_of, same_host, seconds_of, time_of
from .targets import Target
from .transfers import StreamRefused, Transfers
from .volumes import VolumeService

log = logging.getLogger(__name__)

DEFAULT_SYNC = "1m"
MOUNT_HANDOFF_WAIT = 20.0  # a hand-off a Mount asked for waits this long for the old
                           # primary's containers to stop (Docker waits 2 min for the Mount)
PEER_TIMEOUT = 20.0        # asking a peer its role (ssh connect included)
HANDOFF_TIMEOUT = 100.0    # a Mount that asks for a hand-off: within Docker's 2 minutes


class Standbys(RoleChanges):
    """Roles, syncs, hand-off and promote for the volumes of *volumes*."""

    def __init__(self, volumes: VolumeService, transfers: Transfers, backend: Backend,
                 mounts: MountTable, locks: VolumeLocks, book: RoleBook,
                 replications: ReplicationLog, replicator: Replicator, *,
                 advertise: str | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> None:
        """*advertise* is how the other hosts reach this snapvol (``SNAPVOL_ADVERTISE``):
        sent with every sync, it is where a standby asks for a hand-off and where a new
        primary syncs back to."""
        self._volumes = volumes
        self._transfers = transfers
        self._backend = backend
        self._mounts = mounts
        self._locks = locks
        self._book = book
        self._replications = replications
        self._replicator = replicator
        self._advertise = str(Target.parse(advertise)) if advertise else None
        self._clock = clock
        self._guard = threading.Lock()
        self._busy: set[str] = set()                 # volumes syncing or handing off now
        self._last_sync: dict[str, float] = {}       # volume -> monotonic time of last sync try
        self._confirmed: dict[tuple[str, str], float] = {}   # (volume, standby) -> when it took our epoch
        self._listeners: list[Callable[[], None]] = []
        transfers.admit = self.admit
        transfers.admitted = self.admitted
        volumes.on_create(self.created)
        volumes.on_remove(self._book.forget)
        volumes.mount_guard = self.before_mount
        volumes.create_guards.append(self.before_create)

    # ------------------------------------------------------------------ start and create

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call *listener* when a volume becomes a primary with standbys (the scheduler
        re-plans its syncs)."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def recover(self) -> None:
        """At start: finish what a kill interrupted locally (a rename aside)."""
        for volume, role in sorted(self._book.all().items()):
            if role.aside:
                self._finish_aside(volume, role)

    def before_create(self, volume: str, opts: dict[str, str]) -> None:
        """Create of a volume that is not here: refused when ``standby=`` names this very
        host. The same options reach every node (a Swarm service's ``volume-opt``, a Compose
        file), and on the standby node the volume must come from its primary's sync, never
        be made empty: that empty volume is the data loss standbys exist to prevent.

        :raises Conflict: this host is the volume's standby.
        """
        if "standby" not in opts or not self._advertise:
            return
        if any(same_host(target, self._advertise) for target in opts["standby"].split(",")):
            raise Conflict(f"volume {volume} is not here yet, and its option standby= names "
                           f"this host ({self._advertise}): a standby gets the volume from its "
                           "primary's first sync, it never creates it empty. Create it on the "
                           "primary host (run the service's first task there), or wait for the "
                           f"first sync (every {opts.get('sync', DEFAULT_SYNC)})")

    def created(self, volume: str, opts: dict[str, str]) -> None:
        """A volume created with ``standby=`` is a primary at epoch 1."""
        if "standby" not in opts:
            return
        self._book.set(volume, Role(PRIMARY, 1, standbys=tuple(opts["standby"].split(",")),
                                    sync=opts.get("sync", DEFAULT_SYNC)))
        with self._guard:
            self._last_sync.pop(volume, None)       # first sync at the next scheduler pass
        self._changed()

    def role(self, volume: object) -> Role | None:
        return self._book.get(names.volume_name(volume))

    def is_standby(self, volume: str) -> bool:
        role = self._book.get(volume)
        return role is not None and not role.is_primary

    # ------------------------------------------------------------------ receiving (standby side)

    def admit(self, volume: str, header: dict[str, Any]) -> None:
        """Decide, before a byte is received, whether *header*'s stream may update *volume*
        here. A standby sync must come from an epoch at least ours; a plain replication
        never overwrites a standby or a primary with standbys; a standby sync never
        overwrites a volume that is not a standby (a name clash).

        :raises Conflict: refused, with the reason.
        """
        theirs = header.get("role")
        mine = self._book.get(volume)
        exists = self._exists(volume)
        if not isinstance(theirs, dict):
            if mine is not None and exists:
                raise Conflict(f"volume {volume} here is a {mine.role} (epoch {mine.epoch}); "
                               "only its own primary's syncs may change it")
            return
        epoch, primary = epoch_of(theirs), theirs.get("primary")
        if mine is None:
            if exists:
                raise Conflict(f"volume {volume} exists here and is not a standby: refusing to "
                               "overwrite it with a standby sync (a name clash); remove it "
                               "here, or keep the standby on another host")
            self._book.set(volume, Role(STANDBY, epoch, primary=primary,
                                        sync=str(theirs.get("sync") or DEFAULT_SYNC)))
            return
        if mine.aside:
            self._finish_aside(volume, mine)
            mine = self._book.get(volume) or mine
        if mine.is_primary:
            if mine.handoff and same_host(primary, mine.handoff) and epoch > mine.epoch:
                # our hand-off to the sender completed there before we heard back (a kill,
                # a lost answer): nothing was written here since the fence, so this copy is
                # the hand-off's final snapshot and the stream follows on from it
                log.warning("hand-off of %s to %s had completed there (epoch %d): standby here "
                            "now", volume, primary, epoch)
                self._book.set(volume, Role(STANDBY, epoch, primary=primary,
                                            sync=str(theirs.get("sync") or mine.sync)))
                return
            if epoch > mine.epoch and exists:
                aside = self._stand_down(volume, mine, epoch, primary)
                raise StreamRefused(f"volume {volume} was primary here at epoch {mine.epoch}; "
                                    f"a primary at epoch {epoch} exists, so this copy was set "
                                    f"aside as {aside}: send a full stream")
            if epoch > mine.epoch:                       # removed meanwhile: a standby now
                self._book.set(volume, Role(STANDBY, epoch, primary=primary))
                return
            raise Conflict(f"volume {volume} is primary here at epoch {mine.epoch}, not older "
                           f"than the sender's {epoch}: the sender is not the primary and must "
                           "stand down [stale-epoch]")
        if epoch < mine.epoch:
            raise Conflict(f"volume {volume} here is a standby at epoch {mine.epoch}; the "
                           f"sender is a primary of the older epoch {epoch} and must stand "
                           "down [stale-epoch]")
        if epoch == mine.epoch and mine.primary and primary and \
                not same_host(str(primary), mine.primary):
            raise Conflict(f"volume {volume} here is a standby of {mine.primary} at epoch "
                           f"{epoch}, and {primary} claims to be its primary at the same epoch: "
                           "two volumes of one name made on two hosts; refusing to mix them")

    def admitted(self, volume: str, header: dict[str, Any]) -> None:
        """A standby sync was received whole: its epoch and primary are ours now."""
        theirs = header.get("role")
        if not isinstance(theirs, dict):
            return
        mine = self._book.get(volume)
        synced_at = time_of(header.get("created"))
        role = Role(STANDBY, epoch_of(theirs), primary=theirs.get("primary"),
                    sync=str(theirs.get("sync") or DEFAULT_SYNC),
                    synced=header.get("snapshot"), synced_at=synced_at)
        self._book.set(volume, role if mine is None or mine.is_primary
                       else mine.but(epoch=role.epoch, primary=role.primary, sync=role.sync,
                                     synced=role.synced, synced_at=role.synced_at))

    # ------------------------------------------------------------------ syncing (primary side)

    def due(self) -> list[str]:
        """The primaries whose standbys are due for a sync now (counted as started)."""
        now = time.monotonic()
        found = []
        with self._guard:
            for volume, role in self._book.all().items():
                if not role.is_primary or not role.standbys or volume in self._busy:
                    continue
                if names.is_internal(volume):
                    continue                           # in the trash: kept, not synced
                last = self._last_sync.get(volume)
                if last is None or now - last >= seconds_of(role.sync):
                    found.append(volume)
                    self._last_sync[volume] = now      # started now: not due again meanwhile
        return found

    def seconds_to_next(self) -> float | None:
        """Until the next sync is due (None: no standbys anywhere)."""
        now = time.monotonic()
        waits = []
        with self._guard:
            for volume, role in self._book.all().items():
                if role.is_primary and role.standbys and not names.is_internal(volume):
                    last = self._last_sync.get(volume)
                    waits.append(0.0 if last is None else max(0.0, last + seconds_of(role.sync) - now))
        return min(waits, default=None)

    def sync(self, volume: str, *, wait: float = 0.0) -> dict[str, str | None]:
        """Bring every standby of primary *volume* up to a snapshot taken now; a standby that
        fails keeps its error (in the replication record) and the others still get theirs.
        Returns target -> error (None: synced); nothing when a sync or hand-off of the volume
        is running and does not end within *wait* seconds. Also resolves a hand-off in doubt."""
        deadline = time.monotonic() + wait
        while True:
            with self._guard:
                if volume not in self._busy:
                    self._busy.add(volume)
                    self._last_sync[volume] = time.monotonic()
                    break
            if time.monotonic() >= deadline:
                return {}
            time.sleep(0.2)
        try:
            role = self._book.get(volume)
            if role is not None and role.handoff:
                self._resolve_handoff(volume, role)
                role = self._book.get(volume)
            if role is None or not role.is_primary or role.fenced or not role.standbys:
                return {}
            results: dict[str, str | None] = {}
            for target in role.standbys:
                try:
                    self._sync_one(volume, role, target)
                    results[target] = None
                except SteppedDown as exc:
                    results[target] = str(exc)
                    break
                except PluginError as exc:
                    log.warning("sync of %s to standby %s: %s", volume, target, exc)
                    results[target] = str(exc)
                    # (a refusal before any stream was sent is recorded here too)
                    self._replications.record(volume, Replication(
                        target, self._clock(), None, None, 0, str(exc)))
            return results
        finally:
            with self._guard:
                self._busy.discard(volume)

    def _sync_one(self, volume: str, role: Role, target: str,
                  snapshot: str | None = None) -> None:
        peer = self._peer_role(target, volume)
        if peer is not None and peer.get("Role") == "none":
            raise Conflict(f"{target} has a volume {volume} that is not a standby of it: "
                           "refusing to overwrite it (a name clash); remove it there, or "
                           "keep the standby on another host")
        if peer is not None and epoch_of(peer) > role.epoch:
            aside = self._stand_down(volume, role, epoch_of(peer),
                                     peer.get("Primary") if peer.get("Role") == STANDBY else target)
            raise SteppedDown(f"{target} knows volume {volume} at epoch {epoch_of(peer)}, newer "
                              f"than ours ({role.epoch}): this host stood down (its copy is "
                              f"now {aside})")
        self._replicator.replicate(volume, target, snapshot, role=self._header(role))
        with self._guard:
            self._confirmed[(volume, target)] = time.monotonic()

    def _header(self, role: Role) -> dict[str, Any]:
        return {"epoch": role.epoch, "primary": self._advertise, "sync": role.sync}

    # ------------------------------------------------------------------ Mount

    def before_mount(self, volume: str) -> None:
        """Called by Mount before anything else: a standby is not served (it asks its
        primary for a hand-off, and is served if it got one); a fenced primary is not
        served; a primary asks its standbys whether one has a newer epoch (unless one took
        a sync of ours within the sync interval).

        :raises Conflict: not served here now, with what to do.
        """
        role = self._book.get(volume)
        if role is None:
            return
        if role.aside:
            self._finish_aside(volume, role)
            role = self._book.get(volume)
            if role is None:
                return
        if role.is_primary:
            if role.handoff:
                self._resolve_handoff(volume, role)
                role = self._book.get(volume) or role
            if role.is_primary and role.fenced:
                raise Conflict(f"volume {volume} is fenced: {role.fenced}")
            if role.is_primary:
                if not self._mounts.users(volume):   # a second Mount: asked at the first
                    self._confirm_primary(volume, role)
                return
        self._take_over(volume, role)

    def _confirm_primary(self, volume: str, role: Role) -> None:
        fresh = seconds_of(role.sync) * 2
        for target in role.standbys:
            with self._guard:
                confirmed = self._confirmed.get((volume, target))
            if confirmed is not None and time.monotonic() - confirmed < fresh:
                continue
            try:
                peer = self._peer_role(target, volume)
            except PluginError as exc:      # a standby down must not stop the primary
                log.warning("mount %s: cannot ask standby %s its epoch: %s", volume, target, exc)
                continue
            if peer is not None and epoch_of(peer) > role.epoch:
                aside = self._stand_down(volume, role, epoch_of(peer),
                                         peer.get("Primary") if peer.get("Role") == STANDBY else target)
                raise Conflict(f"volume {volume} is not primary here any more: {target} has it "
                               f"at epoch {epoch_of(peer)} (ours was {role.epoch}); this copy was "
                               f"set aside as {aside}")

    def _take_over(self, volume: str, role: Role) -> None:
        """Mount of a standby: ask the primary to hand the volume over to us."""
        synced = self._last_received(volume)
        where = f"a standby of {role.primary or 'an unknown primary'} (epoch {role.epoch}{synced})"
        if not role.primary or not self._advertise:
            raise Conflict(f"volume {volume} here is {where}: it is not served here. On the "
                           f"primary: snapvol handoff {volume} <this host>; if the primary is "
                           f"lost: snapvol promote {volume} here"
                           + ("" if self._advertise else " (SNAPVOL_ADVERTISE is not set here, "
                              "so the primary cannot be asked to hand it over)"))
        log.info("mount %s: a standby here; asking %s for a hand-off", volume, role.primary)
        try:
            status, reply = self._replicator.call(
                role.primary, "Snapvol.Handoff",
                {"Volume": volume, "Target": self._advertise, "Wait": MOUNT_HANDOFF_WAIT},
                timeout=HANDOFF_TIMEOUT)
        except PluginError as exc:
            mine = self._book.get(volume)
            if mine is not None and mine.is_primary:
                # the primary promoted us, then died (or its answer was lost) before it said so
                log.warning("mount %s: the hand-off from %s completed here (epoch %d), though "
                            "its answer was lost: %s", volume, role.primary, mine.epoch, exc)
                return
            raise Conflict(f"volume {volume} here is {where}; the primary cannot be reached "
                           f"for a hand-off ({exc}). If it is lost: snapvol promote {volume} "
                           "here (serves the last synced snapshot)") from None
        mine = self._book.get(volume)
        if mine is None or not mine.is_primary:
            raise Conflict(f"volume {volume} here is {where}; the primary refused the "
                           f"hand-off: {reply.get('Err') or f'HTTP {status}'}")
        log.info("mount %s: took the volume over from %s (epoch %d)", volume, role.primary,
                 mine.epoch)

    # ------------------------------------------------------------------ helpers

    def describe(self, volume: str) -> dict[str, Any] | None:
        """The role for Status (``docker volume inspect``, ``snapvol role``)."""
        role = self._book.get(volume)
        return describe_role(role, volume, self._replications, self._backend, self._clock())

    def _peer_role(self, target: str, volume: str) -> dict[str, Any] | None:
        """The peer's role of *volume* (None: it has no such volume and no role for it).

        :raises TransferFailed: the peer cannot be asked.
        """
        status, reply = self._replicator.call(target, "Snapvol.Role", {"Volume": volume},
                                              timeout=PEER_TIMEOUT)
        if status == 404:
            return None
        if status >= 400:
            raise TransferFailed(f"{target}: {reply.get('Err') or f'HTTP {status}'}")
        return reply

    def _exists(self, volume: str) -> bool:
        try:
            self._backend.volume(volume)
            return True
        except VolumeNotFound:
            return False


class SteppedDown(Conflict):
    """This host found a newer primary and is a standby now."""
