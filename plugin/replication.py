"""Replication: keep a volume's copy on another snapvol up to date, incrementally.

``Replicator.replicate`` finds the newest snapshot both sides hold (by identity: the Btrfs
received UUID or the ZFS guid), sends an incremental stream from it (a full one the first
time) to the target's ``receive``, and records the result; the snapshot the target now holds
is the next base and is never pruned on the source (:class:`~plugin.history.ReplicationLog`).
A failed transfer leaves nothing on the target (receive publishes only a whole, verified
stream), so a retry simply starts again from the last common snapshot. Transfers hold no
volume lock while streaming and run at most ``SNAPVOL_TRANSFERS`` at a time.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

from . import compression as compressions, names, process, stream
from .client import PluginClient, send_stream
from .errors import (CommandFailed, Conflict, InvalidOption, InvalidRequest, NotFound,
                     PluginError, TransferFailed)
from .history import Replication, ReplicationLog
from .targets import Target
from .lifecycle import Lifecycle
from .snapshot_names import REPL_PREFIX, unique_name
from .ssh_client import SshClient
from .transfers import Transfer, Transfers, counted
from .volumes import VolumeService

log = logging.getLogger(__name__)

class Replicator:
    """Replicates the volumes of *volumes* to other snapvol instances through *transfers*."""

    def __init__(self, volumes: VolumeService, transfers: Transfers, lifecycle: Lifecycle,
                 replications: ReplicationLog, *,
                 ssh: SshClient | None = None, timeout: float = 120.0, retries: int = 2,
                 workers: int = 4, compression: str | None = None) -> None:
        """*compression*: how streams travel unless a call says otherwise (``"zstd"``)."""
        self._volumes = volumes
        self._transfers = transfers
        self._lifecycle = lifecycle
        self._log = replications
        self.ssh = ssh or SshClient()
        self._timeout = timeout
        self._retries = retries
        self._compression = compressions.compression(compression)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="snapvol-replicate")

    # ------------------------------------------------------------------ the work

    def replicate(self, volume: object, target: object, snapshot: object = None,
                  progress: Callable[[int], None] | None = None,
                  remote_name: object = None, role: dict[str, Any] | None = None,
                  compression: object = None) -> Replication:
        """Bring *target*'s copy of *volume* (named *remote_name* there, by default the same
        name) up to *snapshot* (a snapshot taken now when None). *role* goes in the stream's
        header (a standby sync: the primary's epoch, see :mod:`plugin.standby`).
        *compression* (``"zstd"``, ``"none"``; None: the setting) compresses the stream.

        :raises InvalidRequest: a bad target; :raises NotFound: no such volume or snapshot;
        :raises Conflict: the target has the volume but no snapshot in common with us;
        :raises TransferFailed: the transfer failed after its retries (recorded, nothing
            half-made on the target).
        """
        volume = names.volume_name(volume)
        remote = names.volume_name(remote_name) if remote_name is not None else volume
        try:
            where = Target.parse(target)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        label = str(where) + (f" as {remote}" if remote != volume else "")
        with self._transfers.slot():
            if snapshot is None:
                snapshot = self._volumes.snapshot([volume], unique_name(REPL_PREFIX))[0].name
            snapshot = names.snapshot_name(snapshot)
            attempt = 0
            # what the last attempt sent: base, token, format and compression
            plan: dict[str, Any] = {"role": role, "format": None,    # None: the best here
                                    "compression": self._compression if compression is None
                                    else compressions.compression(compression)}
            while True:
                attempt += 1
                try:
                    run = self._attempt(volume, remote, where, label, snapshot, attempt, progress, plan)
                except (InvalidRequest, NotFound, Conflict) as exc:
                    self._log.record(volume, Replication(label, _now(), snapshot, None, 0,
                                                         str(exc), attempt))
                    raise
                except (PluginError, OSError) as exc:
                    log.warning("replication of %s to %s, attempt %d: %s", volume, label, attempt, exc)
                    plan["token"] = self._remote_token(where, remote) if "base" in plan else None
                    if plan["token"]:
                        log.info("%s keeps the interrupted transfer: resuming it", label)
                    if attempt > self._retries:
                        message = (f"replication of {volume} to {label} failed after {attempt} "
                                   f"attempt(s): {exc}")
                        self._log.record(volume, Replication(label, _now(), snapshot, None, 0,
                                                             message, attempt))
                        raise TransferFailed(message) from None
                    time.sleep(min(2.0 * attempt, 10.0))
                    continue
                previous = self._log.base(volume, label)
                self._log.record(volume, run)
                self._transfers.move_base(volume, snapshot, previous)
                self._drop_old_replication_snapshots(volume, snapshot)
                return run

    def _attempt(self, volume: str, remote_name: str, where: Target, label: str, snapshot: str,
                 attempt: int, progress: Callable[[int], None] | None,
                 plan: dict[str, Any]) -> Replication:
        if plan.get("token"):    # OpenZFS kept the interrupted receive: send only the rest
            return self._transfer(volume, remote_name, where, label, snapshot, plan["base"],
                                  attempt, progress, plan, resume_token=plan["token"])
        remote = self._remote_snapshots(where, remote_name)
        local = {s.name: s for s in self._volumes.snapshots(volume)}
        if snapshot not in local:
            raise NotFound(f"no such snapshot: {volume}@{snapshot}")
        base = None
        if remote is not None:
            held = {r.get("identity") for r in remote} | {r.get("received") for r in remote}
            held.discard(None)
            held.discard("")
            if local[snapshot].identity in held:
                log.info("%s@%s is already on %s", volume, snapshot, label)
                return Replication(label, _now(), snapshot, None, 0, None, attempt)
            # by identity or by what ours was received from: after a hand-off, the new
            # primary's base is the snapshot it received from the host it now sends back to
            common = [s for s in local.values()
                      if ({s.identity, s.received} & held) and s.created <= local[snapshot].created]
            if not common:
                raise Conflict(f"{where} has a volume {remote_name} with no snapshot in common "
                               f"with {volume}; remove it there to start over with a full stream")
            base = max(common, key=lambda s: s.created).name
        return self._transfer(volume, remote_name, where, label, snapshot, base, attempt,
                              progress, plan)

    def _transfer(self, volume: str, remote_name: str, where: Target, label: str, snapshot: str,
                  base: str | None, attempt: int, progress: Callable[[int], None] | None,
                  plan: dict[str, Any], resume_token: str | None = None) -> Replication:
        plan.update(base=base, token=None)
        transfer = self._transfers.send(volume, snapshot, base, holding_slot=True,
                                        resume_token=resume_token, role=plan.get("role"),
                                        compression=plan["compression"], format=plan["format"],
                                        check=plan.get("check"))
        try:
            reply = self._send_to(where, remote_name, transfer, progress)
        except TransferFailed as exc:
            if f"stream format {stream.NATIVE} is not supported" in str(exc) \
                    or "relies on the native receiver's checks" in str(exc):
                # a target that reads formats 1 and 2 only, or whose storage takes no format 3
                # (ZFS on a snapvol before format 3 for ZFS): the next attempt sends 2
                log.info("%s takes no stream format 3: sending 2", label)
                plan.update(format=stream.FORMAT)
            elif plan["format"] != 1 and "stream format 2 is not supported" in str(exc):
                # a target of snapvol 0.2 reads format 1 only (and knows no compression):
                # the next attempt speaks its language
                log.info("%s reads stream format 1 only: sending that", label)
                plan.update(format=1, compression=None)
            elif "which this snapvol cannot compute" in str(exc):
                # a target without python3-xxhash: the check every snapvol computes
                log.info("%s cannot compute the stream's check: sending crc32", label)
                plan.update(check="crc32")
            raise
        finally:
            transfer.close()
        kind = f"incremental from {base}" if base else "full"
        log.info("replicated %s@%s to %s (%s%s, %d bytes): %s", volume, snapshot, label, kind,
                 ", resumed" if resume_token else "", transfer.bytes, reply)
        return Replication(label, _now(), snapshot, base, transfer.bytes, None, attempt)

    def _drop_old_replication_snapshots(self, volume: str, keep: str) -> None:
        """Older ``repl-`` snapshots were bases of earlier runs; the new one replaces them
        (unless another target still builds on one, or a clone was made from it)."""
        self._lifecycle.retire_older(volume, keep, f"replaced by {keep} as replication base")

    # ------------------------------------------------------------------ targets

    def call(self, target: object, endpoint: str, body: dict[str, Any],
             timeout: float | None = None) -> tuple[int, dict[str, Any]]:
        """Call *endpoint* of the snapvol at *target* (over its socket, or ``snapvol call``
        through ssh); returns the HTTP status and the reply.

        :raises TransferFailed: the target cannot be reached or gave no answer we read.
        """
        where = target if isinstance(target, Target) else Target.parse(target)
        timeout = self._timeout if timeout is None else timeout
        if where.kind == "unix":
            try:
                return PluginClient(str(where.socket), timeout=timeout).call(endpoint, body)
            except (OSError, ValueError) as exc:
                raise TransferFailed(f"{where}: {exc}") from None
        try:
            result = process.run(self._ssh(where, "call", endpoint, json.dumps(body)),
                                 timeout=timeout, ok_codes=(0,))
            answer = json.loads(result.stdout)
            return int(answer["Status"]), dict(answer["Reply"])
        except CommandFailed as exc:
            raise TransferFailed(f"{where}: {exc.stderr.strip()[-300:] or exc}") from None
        except (ValueError, KeyError, TypeError):
            raise TransferFailed(f"{where}: unexpected answer to snapvol call: "
                                 f"{result.stdout[:200]!r}") from None

    def _remote_snapshots(self, where: Target, volume: str) -> list[dict[str, Any]] | None:
        """The target's snapshots of *volume* (identity, received), or None without a volume."""
        if where.kind == "unix":
            status, reply = PluginClient(str(where.socket), timeout=self._timeout).call(
                "Snapvol.SnapshotList", {"Volume": volume})
            if status == 404 and "no such volume" in reply.get("Err", ""):
                return None
            if status != 200:
                raise TransferFailed(f"{where}: {reply.get('Err') or f'HTTP {status}'}")
            return list(reply.get("Snapshots", []))
        result = process.run(self._ssh(where, "snapshot", "ls", volume, "--json"),
                             timeout=self._timeout, ok_codes=(0, 3))
        if result.returncode == 3:
            return None
        try:
            return list(json.loads(result.stdout)["Snapshots"])
        except (ValueError, KeyError, TypeError):
            raise TransferFailed(f"{where}: unexpected answer to snapshot ls: "
                                 f"{result.stdout[:200]!r}") from None

    def _remote_token(self, where: Target, volume: str) -> str | None:
        """The target's resume token for *volume* (None where it has none or cannot tell)."""
        try:
            if where.kind == "unix":
                status, reply = PluginClient(str(where.socket), timeout=self._timeout).call(
                    "Snapvol.ResumeToken", {"Volume": volume})
                token = reply.get("Token") if status == 200 else None
            else:
                result = process.run(self._ssh(where, "resume-token", volume, "--json"),
                                     timeout=self._timeout, ok_codes=(0, 1, 2, 3, 4, 5))
                token = json.loads(result.stdout).get("Token") if result.returncode == 0 else None
        except (PluginError, OSError, ValueError) as exc:
            log.info("no resume token from %s: %s", where, exc)
            return None
        return token if isinstance(token, str) and token else None

    def _send_to(self, where: Target, volume: str, transfer: Transfer,
                 progress: Callable[[int], None] | None) -> str:
        if where.kind == "unix":
            reply = send_stream(f"{where.socket}.stream", volume, transfer, timeout=self._timeout,
                                progress=progress)
            if reply.get("Err"):
                raise TransferFailed(f"{where}: {reply['Err']}")
            return f"received as {reply.get('Snapshot')}"
        argv = self._ssh(where, "receive", volume)
        with process.Streaming(argv, feed=True) as child, _Watchdog(child, self._timeout) as dog:
            try:
                for chunk in counted(transfer, progress):
                    child.proc.stdin.write(chunk)
                    dog.alive()
            except BrokenPipeError:
                pass   # the far side stopped reading; its exit status says why
            try:
                child.finish(timeout=self._timeout)
            except CommandFailed as exc:
                raise TransferFailed(f"{where}: {exc.stderr.strip()[-500:] or exc}") from None
        return "received"

    def _ssh(self, where: Target, *command: str) -> list[str]:
        return self.ssh.argv(where, *command)

    def refuse_unusable(self, opts: dict[str, str]) -> None:
        """At Create: refuse ``replicate=``/``standby=`` over ssh when ssh cannot work from
        here at all (see :meth:`SshClient.unusable`), rather than accept a volume whose every
        sync will fail.

        :raises InvalidOption: the reason, naming the option.
        """
        for option in ("replicate", "standby"):
            if any(t.startswith("ssh://") for t in opts.get(option, "").split(",")):
                why = self.ssh.unusable()
                if why:
                    raise InvalidOption(f"option {option}={opts[option]} cannot work: {why}")

    # ------------------------------------------------------------------ scheduled

    def submit(self, volume: str, target: str, snapshot: str,
               then: Callable[[bool], None] | None = None) -> Future[Replication]:
        """Replicate in the background (after an automatic snapshot); errors are recorded.
        *then* is called afterwards with whether the replication succeeded."""
        def job() -> Replication:
            replicated = False
            try:
                run = self.replicate(volume, target, snapshot)
                replicated = True
                return run
            except PluginError as exc:
                log.error("scheduled replication of %s: %s", volume, exc)
                raise
            finally:
                if then is not None:
                    then(replicated)
        return self._pool.submit(job)

    def run(self, job: Callable[[], object]) -> Future[object]:
        """Run *job* in the replication pool (a standby sync); its exceptions are logged."""
        def logged() -> object:
            try:
                return job()
            except Exception:
                log.exception("background replication job failed")
                raise
        return self._pool.submit(logged)

    def base_known(self, volume: str, target: str) -> bool:
        """Whether the snapshot *target* (as given to :meth:`replicate`, same name there)
        last received of *volume* is on record."""
        try:
            return self._log.base(volume, str(Target.parse(target))) is not None
        except ValueError:
            return False

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Watchdog:
    """Kills a streaming child that has made no progress for *timeout* seconds (a target
    that accepts a connection and then never reads would block a write forever)."""

    def __init__(self, child: process.Streaming, timeout: float) -> None:
        self._child, self._timeout = child, timeout
        self._last = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="snapvol-watchdog")

    def alive(self) -> None:
        self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._done.wait(1.0):
            if time.monotonic() - self._last > self._timeout:
                log.error("transfer stalled for %.0f s: stopping %s", self._timeout, self._child.argv[0])
                self._child.kill()
                return

    def __enter__(self) -> _Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()


def _now() -> datetime:
    return datetime.now(timezone.utc)
