"""Validated restores (``snapvol verify``, ``-o verify=1d``): a snapshot is cloned into a
hidden scratch volume, a check container runs against the clone, the result is recorded, and
the clone is destroyed, always (passed, failed, timed out, or the check could not run).

The scratch clone is one of snapvol's own volumes, ``snapvol.verify.<hex>``
(:func:`plugin.names.internal_name`): backends never list it and no client can name it. The
check container carries the label :data:`CONTAINER_LABEL`; a plugin killed mid-verify leaves
both, and :meth:`Verifier.recover` (the scheduler's first pass after a start) removes the
containers first, then the clones.

While a snapshot is being verified it is pinned like a snapshot being sent
(:class:`~plugin.inflight.InFlight`): not pruned, and its volume is neither removed nor rolled
back (on ZFS the clone depends on it). The newest snapshot that passed is kept by retention
(:meth:`plugin.lifecycle.Lifecycle.needs`): there is always one known-good restore point.

Results live in ``verify.json`` (:class:`~plugin.verify_book.VerifyBook`), per volume the last result and the
last that passed; they move with the volume into the trash and are forgotten when it goes.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Protocol

from . import names
from .backends.base import Backend, VolumeInfo
from .errors import InvalidRequest, NotFound, PluginError, SnapshotNotFound, VolumeBusy
from .inflight import InFlight
from .locks import VolumeLocks
from .units import parse_duration
from .verify_book import ERROR, FAILED, PASSED, VerifyBook, VerifyResult
from .verify_spec import DEFAULT_PATH, DEFAULT_TIMEOUT, CheckSpec, parse_label

log = logging.getLogger(__name__)

KIND = "verify"                             # internal_name(KIND, token): the scratch clones
SCRATCH_PREFIX = f"{names.INTERNAL_PREFIX}{KIND}."
SCRATCH_NAME = re.compile(re.escape(SCRATCH_PREFIX) + r"[0-9a-f]{12}")   # token_hex(6)
CONTAINER_LABEL = "snapvol.verify.clone"    # on check containers: the clone they check
TAIL_LINES = 20


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class VerifyUnavailable(PluginError):
    """This plugin instance cannot run checks (no Docker API, or the managed plugin)."""

    http_status = 501


@dataclass(frozen=True)
class Use:
    """How a container uses a volume, as dockerd tells: its image, where the volume is
    mounted, its ``snapvol.verify`` label."""

    container: str
    image: str
    destination: str
    label: str | None = None


@dataclass(frozen=True)
class CheckRun:
    """One check container to run against the clone *clone* (host path *source*)."""

    clone: str
    source: Path
    image: str
    path: str
    timeout: int
    network: str
    entrypoint: list[str] | None = None
    command: list[str] | None = None
    workdir: str | None = None
    user: str | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    exit_code: int | None           # None: killed at its timeout
    output: str                     # its last lines (stdout and stderr)


class Checks(Protocol):
    """The Docker side (:mod:`plugin.verify_docker`); fakes stand in for it in tests."""

    def usage(self, volume: str) -> Use | None:
        """The container that uses *volume* (running first), or None."""

    def run(self, check: CheckRun) -> Outcome:
        """Run *check* to its end or its timeout (then killed); the container is removed."""

    def remove_leftovers(self) -> int:
        """Remove every check container a killed plugin left; return how many."""


class Verifier:
    """Runs validated restores, records their results, and schedules them."""

    def __init__(self, backend: Backend, locks: VolumeLocks, inflight: InFlight,
                 book: VerifyBook, checks: Checks | None, *, refusal: str | None = None,
                 clock: Callable[[], datetime] = utc_now) -> None:
        """*checks* runs check containers (None, or a *refusal*: verify is refused with
        that message)."""
        self._backend = backend
        self._locks = locks
        self._inflight = inflight
        self.book = book
        self._checks = checks
        self._refusal = refusal
        self._clock = clock
        self._guard = threading.Lock()
        self._running: set[str] = set()
        self._active: dict[str, Path] = {}   # scratch clone -> its mountpoint, while checked
        self._recovering = False
        self._recover_refused: str | None = None   # the last refusal logged as a warning
        self.recovered = False

    # ------------------------------------------------------------------ a verification

    def verify(self, volume: object, snapshot: object = None, overrides: CheckSpec = CheckSpec(),
               progress: Callable[[str], None] = lambda step: None) -> VerifyResult:
        """Verify *snapshot* of *volume* (its newest if None) and record the result.

        :raises InvalidName: a bad name. :raises VolumeNotFound, SnapshotNotFound: no such
            volume or snapshot. :raises InvalidRequest: the volume has no snapshot.
        :raises VolumeBusy: a verification of the volume is running.
        :raises VerifyUnavailable: this instance cannot run checks.
        """
        if self._checks is None or self._refusal:
            raise VerifyUnavailable(self._refusal or "this plugin instance has no Docker API "
                                    "to run checks with")
        volume = names.volume_name(volume)
        info = self._backend.volume(volume)
        listed = [s.name for s in self._backend.snapshots(volume)]
        if snapshot is None:
            if not listed:
                raise InvalidRequest(f"volume {volume} has no snapshot to verify; take one "
                                     f"with: snapvol snapshot create {volume}")
            snapshot = listed[-1]
        snapshot = names.snapshot_name(snapshot)
        if snapshot not in listed:
            raise SnapshotNotFound(volume, snapshot)
        with self._guard:
            if volume in self._running:
                raise VolumeBusy(f"volume {volume} is being verified already")
            if self._recovering:
                raise VolumeBusy("snapvol is removing what an interrupted verification left; "
                                 "try again in a moment")
            self._running.add(volume)
        try:
            result = self._verify(info, snapshot, overrides, progress)
        finally:
            with self._guard:
                self._running.discard(volume)
        passed = self.book.passed(volume)
        self.book.record(result, older_than_passed=passed is not None and passed.snapshot in listed
                         and listed.index(passed.snapshot) > listed.index(snapshot))
        log.info("verified %s@%s: %s in %.1f s%s", volume, snapshot, result.result,
                 result.seconds, f" ({result.message.splitlines()[-1][:200]})"
                 if result.result != PASSED and result.message else "")
        return result

    def _verify(self, info: VolumeInfo, snapshot: str, overrides: CheckSpec,
                progress: Callable[[str], None]) -> VerifyResult:
        started, begun = self._clock(), self._clock()
        image = command = None

        def result(kind: str, message: str) -> VerifyResult:
            seconds = round((self._clock() - begun).total_seconds(), 1)
            return VerifyResult(info.name, snapshot, kind, started.replace(microsecond=0),
                                seconds, message, image, command)

        pins = [(info.name, snapshot)]
        self._inflight.pin(pins)              # not pruned, its volume not removed meanwhile
        try:
            try:
                progress("asking Docker how the volume is used")
                spec = self.resolve(info, overrides)
                image, command = spec.image, spec.command
                scratch = names.internal_name(KIND, secrets.token_hex(6))
                progress(f"cloning {info.name}@{snapshot}")
                with self._locks.hold(info.name, scratch):
                    clone = self._backend.clone(info.name, snapshot, scratch, {})
                with self._guard:
                    self._active[scratch] = clone.mountpoint
                try:
                    progress(f"running the check ({spec.image}"
                             f"{' ' + spec.command if spec.command else ''}; timeout {spec.timeout})")
                    outcome = self._checks.run(self._check_run(spec, scratch, clone.mountpoint))  # type: ignore[union-attr]
                finally:
                    with self._guard:
                        self._active.pop(scratch, None)
                    progress("removing the clone")
                    self._destroy(scratch)
            except PluginError as exc:
                return result(ERROR, str(exc))
        finally:
            self._inflight.unpin(pins)
        if outcome.exit_code == 0:
            return result(PASSED, outcome.output)
        why = (f"the check did not finish within {spec.timeout} and was killed"
               if outcome.exit_code is None else f"the check exited {outcome.exit_code}")
        return result(FAILED, f"{outcome.output.rstrip()}\n{why}".lstrip())

    def resolve(self, info: VolumeInfo, overrides: CheckSpec = CheckSpec()) -> CheckSpec:
        """The check of volume *info*: *overrides* (the command line) over its options over
        the ``snapvol.verify`` label of its container, with its container's image and mount
        path as the defaults.

        :raises PluginError: Docker cannot be asked, the label is bad, or nothing says what
            to run.
        """
        use = self._checks.usage(info.name) if self._checks is not None else None
        label = CheckSpec()
        if use is not None and use.label:
            try:
                label_image, label_command = parse_label(use.label)
            except ValueError as exc:
                raise InvalidRequest(f"container {use.container}: {exc}") from None
            label = CheckSpec(image=label_image, command=label_command)
        spec = overrides.over(CheckSpec.from_options(info.options).over(label))
        if spec.image is None and spec.command is None:
            raise InvalidRequest(
                f"nothing says how to check volume {info.name}: give -o verify-cmd= (e.g. "
                "builtin:postgres), the label snapvol.verify on its container, or --cmd")
        image = spec.image or (use.image if use is not None else None)
        if image is None:
            raise InvalidRequest(f"no image to check volume {info.name} with: give -o "
                                 "verify-image=, --image, or use the volume in a container "
                                 "(its image is the default)")
        path = spec.path or (use.destination if use is not None else None) or DEFAULT_PATH
        return CheckSpec(image=image, command=spec.command, path=path,
                         timeout=spec.timeout or DEFAULT_TIMEOUT, network=spec.network or "none")

    @staticmethod
    def _check_run(spec: CheckSpec, scratch: str, source: Path) -> CheckRun:
        assert spec.image is not None and spec.path is not None
        entrypoint, command, workdir = spec.container(spec.path)
        user = None
        if spec.builtin == "builtin:postgres":
            # PostgreSQL runs as the owner of its data directory: the clone's owner
            st = os.stat(source)
            user = f"{st.st_uid}:{st.st_gid}"
        return CheckRun(clone=scratch, source=source, image=spec.image, path=spec.path,
                        timeout=spec.timeout_seconds, network=spec.network or "none",
                        entrypoint=entrypoint, command=command, workdir=workdir, user=user)

    def active_clone(self, name: object) -> Path | None:
        """The mountpoint of *name* if it is a scratch clone being checked now (the managed
        plugin mounts it into the check container as a volume of its own driver: Docker's
        calls for it are answered from here, with no lock; see ``api/volume_driver``)."""
        with self._guard:
            return self._active.get(name) if isinstance(name, str) else None

    def _destroy(self, scratch: str) -> None:
        """Destroy a scratch clone; a failure is logged (start-up removes it)."""
        try:
            with self._locks.hold(scratch):
                self._backend.destroy_volume(scratch)
        except NotFound:
            pass
        except PluginError as exc:
            log.error("could not remove the verify clone %s (the next start does): %s",
                      scratch, exc)

    # ------------------------------------------------------------------ recovery

    def recover(self) -> bool:
        """Remove what a verification killed midway left: its check containers (through
        Docker), then its scratch clones. Returns whether it is done; not while a
        verification runs (its container and clone are not leftovers), nor when Docker
        cannot be asked (a container may still use a clone): then the caller tries again."""
        with self._guard:
            if self._running:
                return False
            self._recovering = True          # verify() waits for the next try meanwhile
        try:
            if self._checks is not None and not self._refusal:
                try:
                    removed = self._checks.remove_leftovers()
                except PluginError as exc:
                    # Retried on every scheduler wake until Docker answers: say it once (and
                    # again if the reason changes), not every few seconds for as long as a
                    # host runs without a dockerd.
                    level = logging.DEBUG if str(exc) == self._recover_refused else logging.WARNING
                    log.log(level, "verify: cannot remove leftover check containers yet "
                            "(tried again on each scheduler wake): %s", exc)
                    self._recover_refused = str(exc)
                    return False
                self._recover_refused = None
                if removed:
                    log.warning("verify: removed %d check container(s) of an interrupted "
                                "verification", removed)
            for info in self._backend.internal_volumes():
                if info.name.startswith(SCRATCH_PREFIX):
                    log.warning("verify: removing the clone %s of an interrupted verification",
                                info.name)
                    self._destroy(info.name)
            self.recovered = True
            return True
        finally:
            with self._guard:
                self._recovering = False

    def forget_gone(self, existing: set[str]) -> None:
        """Forget the results of volumes that no longer exist (*existing*: every volume,
        the trashed ones under their internal names)."""
        for name in sorted(self.book.volumes() - existing):
            log.warning("volume %s is gone; forgetting its verification results", name)
            self.book.forget(name)

    # ------------------------------------------------------------------ schedule

    def scheduled(self) -> list[tuple[str, datetime]]:
        """(volume, when its next verification is due) of every volume with ``verify=``."""
        due = []
        for info in self._backend.volumes():
            if "verify" not in info.options:
                continue
            last = self.book.last(info.name)
            since = last.started if last is not None else info.created
            due.append((info.name, since + timedelta(seconds=parse_duration(info.options["verify"]))))
        return due

    def next_due(self) -> datetime | None:
        """When the next verification not running now is due (None: no volume has one)."""
        with self._guard:
            running = set(self._running)
        return min((when for volume, when in self.scheduled() if volume not in running),
                   default=None)

    def run_due(self, now: datetime) -> list[str]:
        """Start (each in a thread of its own) the verifications due at *now* that are not
        running; return their volumes."""
        started = []
        for volume, when in self.scheduled():
            with self._guard:
                if when > now or volume in self._running:
                    continue
            threading.Thread(target=self._scheduled_run, args=(volume,), daemon=True,
                             name=f"snapvol-verify-{volume}").start()
            started.append(volume)
        return started

    def _scheduled_run(self, volume: str) -> None:
        try:
            self.verify(volume)
        except InvalidRequest as exc:   # no snapshot yet: recorded, so the cadence holds
            self.book.record(VerifyResult(volume, None, ERROR, self._clock().replace(microsecond=0),
                                          0.0, str(exc)))
        except VolumeBusy:
            pass
        except Exception:               # noqa: BLE001 - logged, the next run is on time
            log.exception("scheduled verification of %s failed", volume)
