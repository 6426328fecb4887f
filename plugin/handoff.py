"""The moves of the primary role between hosts, part of :class:`plugin.standby.Standbys`
(mixed into it: these methods share its role book, its per-volume busy set and its peers):

* **hand-off** (:meth:`RoleChanges.handoff`, run on the primary): fence, wait for the last
  container to unmount, send a final snapshot, tell the standby to become primary at
  epoch+1, then become its standby; and the resolution of a hand-off whose outcome a kill
  or a lost answer left unknown (:meth:`RoleChanges._resolve_handoff`);
* **promote** (:meth:`RoleChanges.promote`, run on a standby): planned, as a hand-off's last
  step, or by hand after losing the primary (serving the last synced snapshot, and saying how
  old it is);
* **standing down** (:meth:`RoleChanges._stand_down`): a primary that met a higher epoch sets
  its copy aside (``NAME-diverged-eN``, never destroyed) and becomes a standby.

Every step is written to the role book before the next, so a kill anywhere leaves either the
old primary (fenced only while the outcome is unknown) or the new one, never two.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Any

from . import names
from .backends.base import Backend
from .errors import Conflict, InvalidRequest, PluginError, TransferFailed, VolumeBusy, VolumeNotFound
from .locks import VolumeLocks
from .mounts import MountTable
from .replication import Replicator
from .roles import PRIMARY, STANDBY, Role, RoleBook
from .snapshot_names import REPL_PREFIX, unique_name
from .standby_common import epoch_of, same_host, seconds_of
from .targets import Target
from .units import rfc3339
from .volumes import VolumeService

log = logging.getLogger(__name__)

UNMOUNT_WAIT = 30.0        # a hand-off waits this long for the primary's containers to stop


class RoleChanges:
    """Hand-off, promote and standing down; see the module. The attributes below are
    :class:`plugin.standby.Standbys`'s, set by its constructor."""

    _volumes: VolumeService
    _backend: Backend
    _mounts: MountTable
    _locks: VolumeLocks
    _book: RoleBook
    _replicator: Replicator
    _advertise: str | None
    _clock: Callable[[], datetime]
    _guard: threading.Lock
    _busy: set[str]
    _last_sync: dict[str, float]

    def _changed(self) -> None:            # Standbys': the scheduler re-plans its syncs
        raise NotImplementedError

    def _header(self, role: Role) -> dict[str, Any]:
        raise NotImplementedError

    def _peer_role(self, target: str, volume: str) -> dict[str, Any] | None:
        raise NotImplementedError

    def _exists(self, volume: str) -> bool:
        raise NotImplementedError

    # ------------------------------------------------------------------ hand-off (primary side)

    def handoff(self, volume: object, target: object, *, wait: float = UNMOUNT_WAIT) -> dict[str, Any]:
        """Hand primary *volume* to *target* (a standby of it): fence, wait for the last
        container to unmount, send a final snapshot, make the target primary at epoch+1,
        become its standby. No committed write is lost: nothing writes after the fence.

        :raises NotFound: no such volume; :raises InvalidRequest: a bad target;
        :raises Conflict: not a primary here, still in use after *wait* seconds, or the
            target refused (the volume stays primary here, unfenced);
        :raises TransferFailed: the outcome is unknown (the volume stays fenced until the
            target can be asked).
        """
        volume = names.volume_name(volume)
        try:
            target = str(Target.parse(target))
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        self._backend.volume(volume)
        role = self._book.get(volume)
        if role is None:
            role = Role(PRIMARY, 0)            # an ordinary volume: this makes it one with roles
        if not role.is_primary:
            if role.primary == target or same_host(role.primary, target):
                return {"volume": volume, "epoch": role.epoch, "primary": target,
                        "note": "already handed off"}
            raise Conflict(f"volume {volume} here is a standby of {role.primary}; hand it off "
                           "from its primary")
        deadline = time.monotonic() + wait          # a sync running now ends first
        while True:
            with self._guard:
                if volume not in self._busy:
                    self._busy.add(volume)
                    break
            if time.monotonic() >= deadline:
                raise VolumeBusy(f"volume {volume} is being synced or handed off; try again")
            time.sleep(0.2)
        try:
            role = self._book.get(volume) or role      # as the sync may have left it
            if not role.is_primary:
                raise Conflict(f"volume {volume} here is a standby of {role.primary} now")
            return self._handoff(volume, role, target, max(0.0, deadline - time.monotonic()))
        finally:
            with self._guard:
                self._busy.discard(volume)

    def _handoff(self, volume: str, role: Role, target: str, wait: float) -> dict[str, Any]:
        started = time.monotonic()
        fenced = role.but(fenced=f"being handed off to {target}", handoff=target)
        self._book.set(volume, fenced)                        # 1. fence: no new Mount
        deadline = time.monotonic() + wait
        while self._mounts.users(volume):                     # 2. the last container goes
            if time.monotonic() > deadline:
                self._book.set(volume, role)
                raise Conflict(f"volume {volume} is still in use by "
                               f"{self._volumes.users_text(volume, self._mounts.users(volume))} "
                               f"after {wait:.0f} s; stop them, then hand off again")
            time.sleep(0.2)
        final = unique_name(REPL_PREFIX)
        try:                                                   # 3. the last delta
            self._volumes.take([volume], final, "none")
            run = self._replicator.replicate(volume, target, final, role=self._header(fenced))
        except PluginError:
            self._book.set(volume, role)           # nothing changed there: still ours
            raise
        epoch = role.epoch + 1
        others = [s for s in role.standbys if not same_host(s, target)]
        body = {"Volume": volume, "Epoch": epoch, "Snapshot": final, "Sync": role.sync,
                "Standbys": ([self._advertise] if self._advertise else []) + others}
        try:                                                   # 4. the target takes it
            status, reply = self._replicator.call(target, "Snapvol.Promote", body)
        except PluginError as exc:
            raise TransferFailed(f"hand-off of {volume} to {target} in doubt: {exc}; the "
                                 "volume stays fenced here until the target answers "
                                 "(or: snapvol promote --force here)") from None
        if status >= 400:
            self._book.set(volume, role)
            raise Conflict(f"{target} refused to take volume {volume}: "
                           f"{reply.get('Err') or f'HTTP {status}'}")
        self._book.set(volume, Role(STANDBY, epoch, primary=target, sync=role.sync))   # 5.
        seconds = round(time.monotonic() - started, 2)
        log.info("handed volume %s off to %s at epoch %d in %.2f s (final delta %d bytes)",
                 volume, target, epoch, seconds, run.bytes)
        return {"volume": volume, "epoch": epoch, "primary": target, "snapshot": final,
                "bytes": run.bytes, "seconds": seconds}

    def _resolve_handoff(self, volume: str, role: Role) -> None:
        """A hand-off whose outcome is unknown: ask the target whether it took the volume."""
        try:
            peer = self._peer_role(str(role.handoff), volume)
        except PluginError as exc:
            log.warning("hand-off of %s to %s still in doubt: %s", volume, role.handoff, exc)
            return
        if peer is not None and peer.get("Role") == PRIMARY and epoch_of(peer) > role.epoch:
            log.warning("hand-off of %s to %s had completed there (epoch %d): standby here now",
                        volume, role.handoff, epoch_of(peer))
            self._book.set(volume, Role(STANDBY, epoch_of(peer), primary=role.handoff,
                                        sync=role.sync))
        else:
            log.warning("hand-off of %s to %s did not complete there: primary here again",
                        volume, role.handoff)
            self._book.set(volume, role.but(fenced=None, handoff=None))

    # ------------------------------------------------------------------ promote (standby side)

    def promote(self, volume: object, *, epoch: object = None, snapshot: object = None,
                standbys: object = None, sync: object = None, force: bool = False) -> dict[str, Any]:
        """Make standby *volume* primary here.

        Planned (a hand-off's step 4: *epoch*, *snapshot* given): only from the epoch
        before, and only holding the final *snapshot*. Manual (failover): refused while the
        primary answers as primary (unless *force*); serves the last synced snapshot and
        says how old it is. A fenced primary (a hand-off in doubt) is unfenced with *force*.

        :raises NotFound: no such volume; :raises Conflict: already primary, or refused.
        """
        volume = names.volume_name(volume)
        self._backend.volume(volume)
        role = self._book.get(volume)
        if role is None or role.is_primary:
            if role is not None and role.fenced and force:
                role = role.but(fenced=None, handoff=None, epoch=role.epoch + 2)
                self._book.set(volume, role)
                return {"volume": volume, "epoch": role.epoch, "note": "unfenced by force"}
            raise Conflict(f"volume {volume} is already primary here"
                           + (f" (epoch {role.epoch})" if role else "") + "; nothing to promote")
        if epoch is not None:
            return self._promote_planned(volume, role, epoch, snapshot, standbys, sync)
        if role.primary and not force:
            try:
                peer = self._peer_role(role.primary, volume)
            except PluginError:
                peer = None                      # lost, as the operator says
            if peer is not None and peer.get("Role") == PRIMARY and not peer.get("Fenced"):
                raise Conflict(f"the primary {role.primary} is up and serves volume {volume} "
                               f"(epoch {epoch_of(peer)}): hand it off there (snapvol handoff "
                               f"{volume} <this host>), or --force to promote anyway")
        newest = self._last_synced(volume, role)
        new = Role(PRIMARY, role.epoch + 1,
                   standbys=(role.primary,) if role.primary else (), sync=role.sync)
        self._book.set(volume, new)
        with self._guard:
            self._last_sync.pop(volume, None)
        self._changed()
        answer: dict[str, Any] = {"volume": volume, "epoch": new.epoch}
        if newest is not None:
            age = (self._clock() - newest.created).total_seconds()
            answer.update(snapshot=newest.name, created=rfc3339(newest.created),
                          age_seconds=round(age),
                          note=f"serving {newest.name} of {rfc3339(newest.created)}: writes "
                               f"on {role.primary} after it (the last {round(age)} s) are not here")
        log.warning("volume %s promoted to primary at epoch %d (was a standby of %s)",
                    volume, new.epoch, role.primary)
        return answer

    def _promote_planned(self, volume: str, role: Role, epoch: object, snapshot: object,
                         standbys: object, sync: object) -> dict[str, Any]:
        if not isinstance(epoch, int) or epoch != role.epoch + 1:
            raise Conflict(f"volume {volume} here is a standby at epoch {role.epoch}; a hand-off "
                           f"must raise it by one, not to {epoch!r}")
        snapshot = names.snapshot_name(snapshot)
        have = {s.name for s in self._backend.snapshots(volume)}
        if snapshot not in have:
            raise Conflict(f"volume {volume} here lacks the hand-off's final snapshot {snapshot}")
        targets = []
        for text in standbys if isinstance(standbys, list) else []:
            try:
                target = str(Target.parse(text))
            except ValueError as exc:
                raise InvalidRequest(f"Standbys: {exc}") from None
            if not same_host(target, self._advertise):    # never a standby of itself
                targets.append(target)
        sync_text = sync if isinstance(sync, str) else role.sync
        seconds_of(sync_text)
        self._book.set(volume, Role(PRIMARY, epoch, standbys=tuple(targets), sync=sync_text))
        with self._guard:
            self._last_sync[volume] = time.monotonic()        # it just synced: wait one interval
        self._changed()
        log.info("volume %s is primary here at epoch %d (handed off; standbys %s)", volume,
                 epoch, ", ".join(targets) or "none")
        return {"volume": volume, "epoch": epoch}

    # ------------------------------------------------------------------ standing down

    def _stand_down(self, volume: str, role: Role, epoch: int, primary: str | None) -> str:
        """A primary met a higher epoch: rename its copy aside (it may hold writes the new
        primary never saw) and become a standby of *primary*, waiting for a full sync.

        :raises Conflict: containers still use it (it stays fenced, refusing new Mounts).
        """
        with self._locks.hold(volume):
            now = self._book.get(volume)
            if now is not None and not now.is_primary and now.epoch >= epoch:
                return f"{volume}-diverged-e{role.epoch}"     # another thread did it
            users = self._mounts.users(volume)
            if users:
                self._book.set(volume, role.but(fenced=f"a newer primary (epoch {epoch}) is "
                                                       f"at {primary}; stop the containers "
                                                       "using it here"))
                raise Conflict(f"volume {volume}: a primary at epoch {epoch} exists at "
                               f"{primary}, but containers still use it here; fenced")
            aside = self._aside_name(volume, role.epoch)
            self._book.set(volume, role.but(aside=aside, fenced="standing down"))
            self._finish_aside(volume, self._book.get(volume) or role, locked=True)
        self._book.set(volume, Role(STANDBY, epoch, primary=primary, sync=role.sync))
        log.warning("volume %s: a primary at epoch %d exists (%s); this copy is kept as "
                    "volume %s and the volume is a standby here now", volume, epoch, primary, aside)
        return aside

    def _finish_aside(self, volume: str, role: Role, *, locked: bool = False) -> None:
        aside = str(role.aside)
        try:
            if locked:
                self._backend.rename_volume(volume, aside)
            else:
                with self._locks.hold(volume, aside):
                    self._backend.rename_volume(volume, aside)
        except VolumeNotFound:
            pass                                        # neither there: nothing to keep
        self._volumes.known.discard(volume)
        self._volumes.known.add(aside)
        self._book.set(volume, role.but(aside=None))

    def _aside_name(self, volume: str, epoch: int) -> str:
        base = f"{volume}-diverged-e{epoch}"[:200]
        name, n = base, 1
        while self._exists(name):
            n += 1
            name = f"{base}-{n}"
        return names.volume_name(name)

    # ------------------------------------------------------------------ what a standby holds

    def _last_received_snapshot(self, volume: str) -> Any:
        snaps = [s for s in self._backend.snapshots(volume) if s.received]
        return snaps[-1] if snaps else None

    def _last_synced(self, volume: str, role: Role) -> Any:
        """The snapshot the standby *volume* serves if promoted now, with the time its primary
        took it (a received snapshot's own time is when it arrived, later: writes between
        the two would be counted as kept)."""
        newest = self._last_received_snapshot(volume)
        if newest is not None and role.synced == newest.name and role.synced_at is not None:
            return replace(newest, created=role.synced_at)
        return newest

    def _last_received(self, volume: str) -> str:
        try:
            role = self._book.get(volume)
            newest = self._last_synced(volume, role) if role is not None else \
                self._last_received_snapshot(volume)
        except PluginError:
            return ""
        if newest is None:
            return ", nothing synced yet"
        age = (self._clock() - newest.created).total_seconds()
        return f", last synced {newest.name}, {round(age)} s old"
