"""Volumes as ZFS datasets: libzfs_core (pyzfs) where it works, the ``zfs`` CLI for the rest.

Layout: one dataset per volume, ``<root>/<name>``, with ``canmount=noauto`` and an explicit
``mountpoint`` under the plugin's mount directory, so a host's ``zfs mount -a`` never mounts a
volume anywhere, and the plugin mounts it itself (at creation, and again on Mount when it is
missing). Ownership and options are user properties:

    snapvol:owner    "snapvol" for a finished volume; "creating"/"removing" while in flux
    snapvol:options  the volume's options as JSON

A dataset without ``snapvol:owner=snapvol`` is never listed, mounted, changed or destroyed.
Creation is committed by the last ``zfs set snapvol:owner=snapvol``, removal starts by
setting ``removing``, so Docker never sees a half-made volume; start-up destroys datasets left
"creating" or "removing" by a crash. A full stream is received into ``<root>/recv:<name>``
(``:`` never occurs in a volume name, so the name alone says whose it is), marked "creating"
and only then renamed to ``<root>/<name>``: a crash at any point leaves either that inbox,
which start-up destroys (or keeps for a resume, with its token, on OpenZFS), or a "creating"
dataset. Listing is one ``zfs get -H -p -d 1`` for all volumes.

libzfs_core (``python3-pyzfs``, OpenZFS with ``/dev/zfs``) creates and destroys datasets; the
CLI does listing, properties and mounting, and is the whole backend on zfs-fuse, which has no
libzfs_core.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from .. import names, process
from ..errors import (BackendError, BackendUnavailable, CommandFailed, Conflict, InvalidOption,
                      SnapshotExists, SnapshotNotFound, VolumeExists, VolumeNotFound)
from ..mountinfo import mounted_filesystem
from ..units import parse_size
from .base import Leftover, SnapshotInfo, Usage, VolumeInfo, snapshot_each

log = logging.getLogger(__name__)

OWNER = "snapvol:owner"
INBOX = "recv:"                  # <root>/recv:<name>: a full stream being received for <name>
HOLD_TAG = "snapvol-replication"
OPTIONS = "snapvol:options"
_TIMEOUT = 120.0
_RECEIVE_TIMEOUT = 600.0          # to finish after the last byte of a stream
_BUSY_WAIT = 10.0
_ZFS_FUSE_COMPRESSION = frozenset(["on", "off", "lzjb", "gzip", "zle"]
                                  + [f"gzip-{n}" for n in range(1, 10)])
_MISSING = re.compile(r"dataset does not exist|no such (pool|dataset)")
_OUT_OF_SPACE = re.compile(r"out of space|no space left", re.IGNORECASE)


def load_libzfs_core() -> Any | None:
    """The ``libzfs_core`` module when OpenZFS's kernel interface is usable, else ``None``."""
    if not os.path.exists("/dev/zfs"):
        return None
    try:
        import libzfs_core  # type: ignore[import-not-found]  # Debian's python3-pyzfs
    except ImportError:
        return None
    return libzfs_core


def _run_while_busy(argv: list[str]) -> None:
    """Run a zfs command, retrying for a while as long as it fails with "busy": zfs-fuse
    releases an unmounted dataset asynchronously, so destroy or mount right after an unmount
    can fail for a moment."""
    deadline = time.monotonic() + _BUSY_WAIT
    while True:
        try:
            process.run(argv, timeout=_TIMEOUT)
            return
        except CommandFailed as exc:
            if "busy" not in exc.stderr or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def lzc_failed(action: str, exc: Exception) -> BackendError:
    """The :class:`BackendError` for a failed libzfs_core call: its errno kept (as the
    attribute, and by name in the message), and for calls on several snapshots each one's
    own error (pyzfs's ``MultipleOperationsError`` keeps them in ``errors``; its own message
    only says "one or more reasons")."""
    code = getattr(exc, "errno", None)

    def explain(error: Exception) -> str:
        number = getattr(error, "errno", None)
        text = getattr(error, "message", None) or str(error) or type(error).__name__
        name = getattr(error, "name", None)
        where = f" ({name.decode(errors='replace') if isinstance(name, bytes) else name})" if name else ""
        return f"{errno.errorcode.get(number, number)}: {text}{where}" if isinstance(number, int) else text

    details = [explain(exc)] + [explain(sub) for sub in getattr(exc, "errors", None) or ()]
    return BackendError(f"{action}: {'; '.join(details)}", errno=code if isinstance(code, int) else None)


class ZfsBackend:
    """Volumes as datasets below the parent dataset *root*, mounted below *mount_base*."""

    kind: ClassVar[str] = "zfs"
    rollback_keeps_newer: ClassVar[bool] = False        # zfs rollback -r destroys them
    clones_need_origin: ClassVar[bool] = True           # destroy refuses while a clone exists

    def __init__(self, root: str, mount_base: Path, lzc: Any | None = None) -> None:
        self.root = root
        self.pool = root.split("/", 1)[0]
        self.mount_base = mount_base
        self._lzc = lzc
        self.atomic_snapshots = lzc is not None     # lzc_snapshot takes a list; zfs-fuse's CLI one name
        self.resumable = lzc is not None            # OpenZFS: receive -s; zfs-fuse has no resume
        self.compressions: frozenset[str] = frozenset()
        self._facts: dict[str, Any] = {}

    # ------------------------------------------------------------------ start-up

    def preflight(self) -> None:
        """Whether this storage can work at all, in two quick ``zpool``/``zfs`` calls.

        :raises BackendUnavailable: no such pool, no zfs tools, or userland and kernel module
            versions differ (OpenZFS refuses some ioctls across versions).
        """
        try:
            pools = process.run(["zpool", "list", "-H", "-o", "name"], timeout=_TIMEOUT).stdout.split()
        except BackendError as exc:
            raise BackendUnavailable(f"ZFS is not usable here: {exc}") from None
        if self.pool not in pools:
            raise BackendUnavailable(f"ZFS pool {self.pool} does not exist (SNAPVOL_ZFS_ROOT={self.root}); "
                                     "create it, or point SNAPVOL_ZFS_ROOT at an existing pool")
        self._check_versions()

    def check(self) -> None:
        """:meth:`preflight`, then create the parent dataset, detect capabilities, and finish
        operations a crash interrupted.

        :raises BackendUnavailable: as :meth:`preflight`.
        """
        self.preflight()
        if self._get(self.root, ["type"], missing_ok=True) is None:
            log.info("creating parent dataset %s", self.root)
            process.run(["zfs", "create", "-p", "-o", "mountpoint=none", "-o", "canmount=off",
                         self.root], timeout=_TIMEOUT)
        self.mount_base.mkdir(parents=True, exist_ok=True, mode=0o711)
        self.compressions = self._detect_compressions()
        self._facts.update({"libzfs_core": self._lzc is not None,
                            "compression": sorted(self.compressions)})
        log.info("zfs backend on %s: libzfs_core=%s, compression=%s", self.root,
                 self._lzc is not None, ",".join(sorted(self.compressions)))
        self.finish_interrupted()

    def _check_versions(self) -> None:
        if not os.path.exists("/dev/zfs"):
            self._facts["implementation"] = "zfs-fuse"
            return
        out = process.run(["zfs", "version"], timeout=_TIMEOUT, ok_codes=(0, 1, 2)).stdout
        versions = re.findall(r"^zfs(-kmod)?-(\S+)", out, re.M)
        user = next((v for kmod, v in versions if not kmod), None)
        kernel = next((v for kmod, v in versions if kmod), None)
        self._facts["implementation"] = f"OpenZFS {user} (module {kernel})"
        if user and kernel and user.split("-")[0] != kernel.split("-")[0]:
            raise BackendUnavailable(f"zfs userland {user} and kernel module {kernel} differ; "
                                     "install matching versions (or reboot into the new module)")

    def _detect_compressions(self) -> frozenset[str]:
        if not os.path.exists("/dev/zfs"):
            return _ZFS_FUSE_COMPRESSION          # zfs-fuse (pool version 23): no lz4, no zstd
        found = set(_ZFS_FUSE_COMPRESSION)
        features = process.run(["zpool", "get", "-H", "-o", "property,value",
                                "feature@lz4_compress,feature@zstd_compress", self.pool],
                               timeout=_TIMEOUT, ok_codes=(0, 1)).stdout
        for line in features.splitlines():
            prop, _, value = line.partition("\t")
            if value in ("enabled", "active"):
                if prop == "feature@lz4_compress":
                    found.add("lz4")
                elif prop == "feature@zstd_compress":
                    found |= {"zstd", "zstd-fast"} | {f"zstd-{n}" for n in range(1, 20)}
        return frozenset(found)

    def leftovers(self) -> list[Leftover]:
        """What :meth:`finish_interrupted` would do, found without changing anything."""
        found = []
        for name, props in self._children().items():
            dataset = f"{self.root}/{name}"
            if name.startswith(INBOX):
                if not (self.resumable and self._token(dataset)):   # else: kept for a resume
                    found.append(Leftover(name.removeprefix(INBOX),
                                          f"{dataset}: an interrupted receive", "destroy it"))
            elif props.get(OWNER) in ("creating", "removing"):
                found.append(Leftover(name, f"{dataset}: left {props[OWNER]} by an interrupted "
                                      "operation", "destroy it"))
        return found

    def finish_interrupted(self) -> None:
        """Destroy what crashed operations left: inboxes of receives that cannot resume,
        datasets left "creating" or "removing"."""
        for name, props in self._children().items():
            if name.startswith(INBOX):
                self._drop_inbox(f"{self.root}/{name}", keep_resumable=True)
            elif props.get(OWNER) in ("creating", "removing"):
                log.info("destroying %s/%s left %s by an interrupted operation",
                         self.root, name, props[OWNER])
                try:
                    self._destroy(f"{self.root}/{name}", mounted=props.get("mounted") == "yes")
                except BackendError as exc:
                    log.error("could not destroy %s/%s: %s", self.root, name, exc)

    def describe(self) -> dict[str, Any]:
        return {"root": self.root, "filesystem": "zfs", "mounts": str(self.mount_base), **self._facts}

    # ------------------------------------------------------------------ queries

    def volumes(self) -> list[VolumeInfo]:
        return [self._info(name, props) for name, props in self._children().items()
                if props.get(OWNER) == "snapvol"]

    def volume(self, name: str) -> VolumeInfo:
        props = self._get(self._dataset(name), [OWNER, OPTIONS, "creation"], missing_ok=True)
        if props is None or props.get(OWNER) != "snapvol":
            self._require_healthy()
            raise VolumeNotFound(name)
        return self._info(name, props)

    def usage(self, name: str) -> Usage:
        props = self._get(self._owned(name), ["referenced", "refquota"])
        quota = int(props["refquota"]) if props["refquota"].isdigit() else 0
        return Usage(int(props["referenced"]), quota or None)

    def _children(self) -> dict[str, dict[str, str]]:
        """Volume-like datasets directly below the root, with the properties we list by."""
        try:
            out = process.run(["zfs", "get", "-H", "-p", "-r", "-d", "1", "-o", "name,property,value",
                               f"type,creation,mounted,{OWNER},{OPTIONS}", self.root],
                              timeout=_TIMEOUT).stdout
        except CommandFailed as exc:
            raise BackendUnavailable(f"cannot list {self.root}: {exc}") from None
        children: dict[str, dict[str, str]] = {}
        prefix = self.root + "/"
        for line in out.splitlines():
            dataset, prop, value = line.split("\t", 2)
            if dataset.startswith(prefix) and "/" not in dataset[len(prefix):] and "@" not in dataset:
                children.setdefault(dataset[len(prefix):], {})[prop] = value
        return {name: props for name, props in children.items() if props.get("type") == "filesystem"}

    def _info(self, name: str, props: Mapping[str, str]) -> VolumeInfo:
        try:
            opts = json.loads(props.get(OPTIONS, "{}"))
        except ValueError:
            opts = {}
        return VolumeInfo(name=name, mountpoint=self._mountpoint(name),
                          created=datetime.fromtimestamp(int(props["creation"]), tz=timezone.utc),
                          options=opts if isinstance(opts, dict) else {})

    # ------------------------------------------------------------------ changes

    def create_volume(self, name: str, options: Mapping[str, str]) -> VolumeInfo:
        dataset = self._dataset(name)
        existing = self._get(dataset, [OWNER], missing_ok=True)
        if existing is not None:
            owner = "snapvol" if existing.get(OWNER) == "snapvol" else "something else (not snapvol)"
            raise VolumeExists(f"volume {name} already exists (made by {owner})")
        mountpoint = self._mountpoint(name)
        props = self._properties(name, options)
        try:
            self._create(dataset, props)
            self._mount(dataset, mountpoint)
            os.chmod(mountpoint, int(options.get("mode", "755"), 8))
            if "uid" in options or "gid" in options:
                os.chown(mountpoint, int(options.get("uid", -1)), int(options.get("gid", -1)))
            self._set(dataset, OWNER, "snapvol")       # the commit point
        except BaseException as exc:
            try:
                if (self._get(dataset, [OWNER], missing_ok=True) or {}).get(OWNER) == "creating":
                    self._destroy(dataset, mounted=True)
            except BackendError as cleanup:   # report the cause, not the cleanup; start-up retries
                log.error("could not remove half-made %s (removed at next start): %s", dataset, cleanup)
            if isinstance(exc, OSError):
                raise BackendError(f"cannot create volume {name}: {exc}", errno=exc.errno) from None
            raise
        log.info("created volume %s (options: %s)", name, ", ".join(sorted(options)) or "none")
        return self.volume(name)

    def destroy_volume(self, name: str) -> None:
        """Destroy the dataset and its snapshots; volumes cloned from one of them are
        promoted first (they take over the snapshots they need), so they keep working."""
        dataset = self._owned(name)
        self._promote_clones(dataset)
        try:
            self._set(dataset, OWNER, "removing")       # invisible from here on
        except CommandFailed as exc:
            if not _OUT_OF_SPACE.search(exc.stderr):
                raise
            # A full pool refuses a property change but not a destroy (ZFS keeps slop space
            # for it), and removing a volume is how a user frees space. Without the mark, a
            # crash from here leaves the volume visible; a repeated Remove finishes it.
            log.warning("pool full: removing volume %s without marking it first", name)
        self._destroy(dataset, mounted=True)
        log.info("removed volume %s", name)

    def _promote_clones(self, dataset: str) -> None:
        for _ in range(1000):   # each promote moves at least one snapshot away from dataset
            out = process.run(["zfs", "get", "-H", "-p", "-r", "-d", "1", "-o",
                               "name,property,value", f"origin,{OWNER}", self.root],
                              timeout=_TIMEOUT).stdout
            props: dict[str, dict[str, str]] = {}
            for line in out.splitlines():
                name, prop, value = line.split("\t", 2)
                props.setdefault(name, {})[prop] = value
            clones = sorted(child for child, p in props.items()
                            if p.get("origin", "").startswith(dataset + "@")
                            and p.get(OWNER) == "snapvol")
            if not clones:
                return
            process.run(["zfs", "promote", clones[0]], timeout=_TIMEOUT)
            log.info("promoted %s: it no longer depends on %s, which is being removed",
                     clones[0], dataset)

    # ------------------------------------------------------------------ snapshots

    def snapshots(self, volume: str) -> list[SnapshotInfo]:
        # `zfs get -r` lists snapshots in creation order; creation has whole seconds, so the
        # stable sort keeps that order within a second
        return sorted(self._snapshots(self._owned(volume), volume).values(),
                      key=lambda s: s.created)

    def create_snapshot(self, volume: str, snapshot: str) -> SnapshotInfo:
        dataset = self._owned(volume)
        full = f"{dataset}@{names.snapshot_name(snapshot)}"
        if snapshot in self._snapshots(dataset, volume):
            raise SnapshotExists(f"snapshot {volume}@{snapshot} already exists")
        if self._lzc is not None:
            try:
                self._lzc.lzc_snapshot([full.encode()])
            except Exception as exc:
                raise lzc_failed(f"cannot snapshot {volume}", exc) from None
        else:
            process.run(["zfs", "snapshot", full], timeout=_TIMEOUT)
        log.info("took snapshot %s@%s", volume, snapshot)
        return self._snapshots(dataset, volume)[snapshot]

    def create_snapshots(self, volumes: list[str], snapshot: str) -> list[SnapshotInfo]:
        """libzfs_core: one ``lzc_snapshot`` call, atomic (one transaction group) across the
        datasets of a pool. zfs-fuse's ``zfs snapshot`` takes one name per call, so there
        they are taken one after another (all or none)."""
        if self._lzc is None or len(volumes) < 2:
            return snapshot_each(self, volumes, snapshot)
        fulls = []
        for volume in volumes:
            dataset = self._owned(volume)
            if snapshot in self._snapshots(dataset, volume):
                raise SnapshotExists(f"snapshot {volume}@{snapshot} already exists")
            fulls.append(f"{dataset}@{names.snapshot_name(snapshot)}")
        try:
            self._lzc.lzc_snapshot([f.encode() for f in fulls])
        except Exception as exc:
            raise lzc_failed(f"cannot snapshot {', '.join(volumes)}", exc) from None
        log.info("took snapshot %s of %s in one transaction", snapshot, ", ".join(volumes))
        return [self._snapshots(self._dataset(v), v)[snapshot] for v in volumes]

    def destroy_snapshot(self, volume: str, snapshot: str) -> None:
        full = self._owned_snapshot(volume, snapshot)
        if self._lzc is not None:
            try:
                self._lzc.lzc_destroy_snaps([full.encode()], defer=False)
            except Exception as exc:
                if HOLD_TAG.encode() in self._lzc.lzc_get_holds(full.encode()):
                    raise Conflict(f"snapshot {volume}@{snapshot} is the base of a replication "
                                   "(held by snapvol); it is released when a newer one replaces "
                                   "it or the volume is removed") from None
                raise lzc_failed(f"cannot destroy snapshot {volume}@{snapshot}", exc) from None
        else:
            _run_while_busy(["zfs", "destroy", full])
        log.info("removed snapshot %s@%s", volume, snapshot)

    def clone(self, volume: str, snapshot: str, new_volume: str,
              options: Mapping[str, str]) -> VolumeInfo:
        origin = self._owned_snapshot(volume, snapshot)
        dataset = self._dataset(new_volume)
        if self._get(dataset, [OWNER], missing_ok=True) is not None:
            raise VolumeExists(f"volume {new_volume} already exists")
        props = self._properties(new_volume, options)
        try:
            if self._lzc is not None:
                user = {k.encode(): v.encode() for k, v in props.items() if ":" in k}
                try:
                    self._lzc.lzc_clone(dataset.encode(), origin.encode(), props=user)
                except Exception as exc:
                    raise lzc_failed(f"cannot clone {origin}", exc) from None
                for prop, value in props.items():
                    if ":" not in prop:
                        self._set(dataset, prop, value)
            else:
                argv = ["zfs", "clone"]
                for prop, value in props.items():
                    argv += ["-o", f"{prop}={value}"]
                process.run([*argv, origin, dataset], timeout=_TIMEOUT)
            self._mount(dataset, self._mountpoint(new_volume))
            self._set(dataset, OWNER, "snapvol")
        except BaseException:
            try:
                if (self._get(dataset, [OWNER], missing_ok=True) or {}).get(OWNER) == "creating":
                    self._destroy(dataset, mounted=True)
            except BackendError as cleanup:
                log.error("could not remove half-made %s (removed at next start): %s", dataset, cleanup)
            raise
        log.info("cloned %s@%s as %s", volume, snapshot, new_volume)
        return self.volume(new_volume)

    def rollback(self, volume: str, snapshot: str) -> None:
        """``zfs rollback -r``: snapshots newer than *snapshot* are destroyed (the caller
        agreed, see ``rollback_keeps_newer``)."""
        full = self._owned_snapshot(volume, snapshot)
        try:
            process.run(["zfs", "rollback", "-r", full], timeout=_TIMEOUT)
        except CommandFailed as exc:
            if "clones of previous snapshots exist" not in exc.stderr:
                raise
            prefix = self.root + "/"
            clones = [line.strip().removeprefix(prefix) for line in exc.stderr.splitlines()
                      if line.strip().startswith(prefix)]
            raise Conflict(f"cannot roll {volume} back to {snapshot}: volume(s) "
                           f"{', '.join(clones) or '?'} were cloned from a newer snapshot of it; "
                           "remove them first (ZFS keeps a clone's origin)") from None
        log.info("rolled volume %s back to snapshot %s", volume, snapshot)

    def hold(self, volume: str, snapshot: str) -> None:
        """A user hold (OpenZFS, libzfs_core) so nothing destroys a replication base by
        accident; without libzfs_core (zfs-fuse, whose holds are broken) snapvol's own record
        is the only protection."""
        if self._lzc is None:
            return
        full = self._owned_snapshot(volume, snapshot).encode()
        try:
            if HOLD_TAG.encode() not in self._lzc.lzc_get_holds(full):
                self._lzc.lzc_hold({full: HOLD_TAG.encode()})
        except Exception as exc:
            raise lzc_failed(f"cannot hold {volume}@{snapshot}", exc) from None

    def release(self, volume: str, snapshot: str) -> None:
        if self._lzc is None:
            return
        try:
            self._release_all([f"{self._owned_snapshot(volume, snapshot)}"])
        except SnapshotNotFound:
            pass

    def _release_all(self, snapshots: list[str]) -> None:
        """Drop snapvol's hold from each of *snapshots* (missing holds are fine)."""
        if self._lzc is None or not snapshots:
            return
        try:
            self._lzc.lzc_release({s.encode(): [HOLD_TAG.encode()] for s in snapshots})
        except Exception as exc:
            raise lzc_failed("cannot release snapvol's holds", exc) from None

    # ------------------------------------------------------------------ send / receive

    def resume_token(self, volume: str) -> str | None:
        """The state of an interrupted resumable receive into *volume* (OpenZFS), if any."""
        if not self.resumable:
            return None
        for dataset in (self._dataset(volume), self._inbox(volume)):   # incremental, full
            token = self._token(dataset)
            if token:
                return token
        return None

    def _token(self, dataset: str) -> str | None:
        props = self._get(dataset, ["receive_resume_token"], missing_ok=True)
        token = (props or {}).get("receive_resume_token", "-")
        return None if token in ("-", "") else token

    def _inbox(self, volume: str) -> str:
        return f"{self.root}/{INBOX}{names.volume_name(volume)}"

    def _drop_inbox(self, inbox: str, *, keep_resumable: bool) -> None:
        """Destroy the inbox of a full receive that did not finish (unless, with
        *keep_resumable*, OpenZFS kept its state for a resume)."""
        if self._get(inbox, ["type"], missing_ok=True) is None:
            return
        if keep_resumable and self.resumable and self._token(inbox):
            log.info("keeping the interrupted receive %s for a resume", inbox)
            return
        log.info("destroying %s, left by an interrupted receive", inbox)
        try:
            if self.resumable and self._token(inbox):
                process.run(["zfs", "receive", "-A", inbox], timeout=_TIMEOUT)
            if self._get(inbox, ["type"], missing_ok=True) is not None:
                self._destroy(inbox, mounted=False)
        except BackendError as exc:
            log.error("could not destroy %s: %s", inbox, exc)

    def send_argv(self, volume: str, snapshot: str, base: str | None, *,
                  resume_token: str | None = None) -> list[str]:
        full = self._owned_snapshot(volume, snapshot)
        if resume_token is not None:
            if not re.fullmatch(r"[0-9a-f-]{1,8192}", resume_token):
                raise InvalidOption("a resume token is hexadecimal, as `zfs get receive_resume_token` shows it")
            return ["zfs", "send", "-t", resume_token]
        if base is None:
            return ["zfs", "send", full]
        self._owned_snapshot(volume, base)
        return ["zfs", "send", "-i", f"@{base}", full]

    @contextmanager
    def receiving(self, volume: str, snapshot: str, base: str | None,
                  options: Mapping[str, str], *, resume: bool = False) -> Iterator[BinaryIO]:
        """``zfs receive -u``. A full stream goes into the inbox ``<root>/recv:<volume>``,
        which becomes the volume only once complete (marked "creating", renamed, properties
        set, mounted, then owned); an incremental one (``-F``: local changes since the last
        snapshot are discarded) is applied by ZFS atomically at the end of the stream, or not
        at all.

        On OpenZFS the receive is resumable (``-s``): an interrupted one leaves its state in
        the inbox (full) or the dataset (incremental), :meth:`resume_token` gives the token,
        and a stream from ``send_argv(..., resume_token=)`` received with *resume* completes
        it. A new stream for the volume drops such a state first."""
        dataset = self._dataset(volume)
        names.snapshot_name(snapshot)
        if base is None:
            if self._get(dataset, [OWNER], missing_ok=True) is not None:
                raise VolumeExists(f"volume {volume} already exists; a full stream makes a new "
                                   "volume (remove it, or send an incremental stream)")
            target = self._inbox(volume)
            if not (resume and self.resumable and self._token(target)):
                self._drop_inbox(target, keep_resumable=False)
            argv = ["zfs", "receive", "-u", target]
        else:
            target = dataset
            if self.resumable and self._token(dataset) and not resume:
                log.info("dropping the interrupted receive into %s", dataset)
                process.run(["zfs", "receive", "-A", dataset], timeout=_TIMEOUT)
            self._owned_snapshot(volume, base)
            if snapshot in self._snapshots(dataset, volume):
                raise SnapshotExists(f"snapshot {volume}@{snapshot} already exists")
            argv = ["zfs", "receive", "-u", *([] if resume else ["-F"]), dataset]
            # unmounted while it changes underneath (zfs-fuse would keep serving stale
            # content); the caller made sure no container uses it
            if self._is_mounted(self._mountpoint(volume)):
                _run_while_busy(["zfs", "unmount", dataset])
        if self.resumable:
            argv.insert(2, "-s")
        try:
            with process.Streaming(argv, feed=True) as child:
                try:
                    yield child.proc.stdin   # type: ignore[misc]
                except BaseException:
                    if self.resumable:       # let it see the end of its input and save its state
                        child.close_input_and_wait(timeout=60.0)
                    raise
                child.finish(timeout=_RECEIVE_TIMEOUT)
        except BaseException:
            if base is None and not self.resumable:
                self._drop_inbox(target, keep_resumable=False)    # nothing half-made
            raise
        finally:
            if base is not None:
                self._mount(dataset, self._mountpoint(volume))
        if base is not None:
            log.info("received %s@%s (incremental)", volume, snapshot)
            return
        try:
            self._set(target, OWNER, "creating")          # from here on start-up knows it
            process.run(["zfs", "rename", target, dataset], timeout=_TIMEOUT)
            for prop, value in self._properties(volume, options).items():
                self._set(dataset, prop, value)
            self._mount(dataset, self._mountpoint(volume))
            self._set(dataset, OWNER, "snapvol")        # the commit point
        except BaseException:
            try:
                self._drop_inbox(target, keep_resumable=False)
                if (self._get(dataset, [OWNER], missing_ok=True) or {}).get(OWNER) == "creating":
                    self._destroy(dataset, mounted=True)
            except BackendError as cleanup:
                log.error("could not remove half-received %s (removed at next start): %s",
                          dataset, cleanup)
            raise
        log.info("received %s@%s (full)", volume, snapshot)

    def _snapshots(self, dataset: str, volume: str) -> dict[str, SnapshotInfo]:
        out = process.run(["zfs", "get", "-H", "-p", "-r", "-d", "1", "-o", "name,property,value",
                           "creation,guid", dataset], timeout=_TIMEOUT).stdout
        props: dict[str, dict[str, str]] = {}
        for line in out.splitlines():
            name, prop, value = line.split("\t", 2)
            if name.startswith(dataset + "@"):
                props.setdefault(name.split("@", 1)[1], {})[prop] = value
        # a received snapshot keeps its guid: it is its own "received" identity
        return {snap: SnapshotInfo(volume, snap,
                                   datetime.fromtimestamp(int(p["creation"]), tz=timezone.utc),
                                   format(int(p["guid"]), "x"), format(int(p["guid"]), "x"))
                for snap, p in props.items()}

    def _owned_snapshot(self, volume: str, snapshot: str) -> str:
        dataset = self._owned(volume)
        if names.snapshot_name(snapshot) not in self._snapshots(dataset, volume):
            raise SnapshotNotFound(volume, snapshot)
        return f"{dataset}@{snapshot}"

    def _properties(self, name: str, options: Mapping[str, str]) -> dict[str, str]:
        """The properties of a new volume's dataset (owner "creating" until it is complete)."""
        props = {OWNER: "creating", OPTIONS: json.dumps(dict(sorted(options.items()))),
                 "canmount": "noauto", "mountpoint": str(self._mountpoint(name))}
        if "size" in options:
            props["refquota"] = str(parse_size(options["size"]))
        for key in ("compression", "recordsize", "atime"):
            if key in options:
                props[key] = options[key]
        return props

    def attach(self, name: str) -> Path:
        dataset = self._owned(name)
        mountpoint = self._mountpoint(name)
        if not self._is_mounted(mountpoint):
            log.info("mounting %s at %s", dataset, mountpoint)
            self._mount(dataset, mountpoint)
        return mountpoint

    def detach(self, name: str) -> None:
        """Volumes stay mounted while they exist; nothing to undo."""

    # ------------------------------------------------------------------ helpers

    def _dataset(self, name: str) -> str:
        return f"{self.root}/{names.volume_name(name)}"

    def _mountpoint(self, name: str) -> Path:
        return names.under(self.mount_base, names.volume_name(name))

    def _owned(self, name: str) -> str:
        dataset = self._dataset(name)
        props = self._get(dataset, [OWNER], missing_ok=True)
        if props is None or props.get(OWNER) != "snapvol":
            self._require_healthy()
            raise VolumeNotFound(name)
        return dataset

    def _get(self, dataset: str, props: list[str], *, missing_ok: bool = False) -> dict[str, str] | None:
        try:
            out = process.run(["zfs", "get", "-H", "-p", "-o", "property,value", ",".join(props),
                               dataset], timeout=_TIMEOUT).stdout
        except CommandFailed as exc:
            if missing_ok and _MISSING.search(exc.stderr):
                return None
            raise
        return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)

    def _set(self, dataset: str, prop: str, value: str) -> None:
        process.run(["zfs", "set", f"{prop}={value}", dataset], timeout=_TIMEOUT)

    def _create(self, dataset: str, props: Mapping[str, str]) -> None:
        if self._lzc is not None:
            user = {k.encode(): v.encode() for k, v in props.items() if ":" in k}
            try:
                self._lzc.lzc_create(dataset.encode(), props=user)
            except Exception as exc:            # pyzfs raises its own ZFSError tree
                raise lzc_failed(f"cannot create dataset {dataset}", exc) from None
            for prop, value in props.items():
                if ":" not in prop:
                    self._set(dataset, prop, value)
            return
        argv = ["zfs", "create"]
        for prop, value in props.items():
            argv += ["-o", f"{prop}={value}"]
        try:
            process.run([*argv, dataset], timeout=_TIMEOUT)
        except CommandFailed as exc:
            if "property" in exc.stderr or "invalid" in exc.stderr:
                raise InvalidOption(f"zfs refused the options: {exc.stderr.strip()}") from None
            raise

    def _mount(self, dataset: str, mountpoint: Path) -> None:
        mountpoint.mkdir(parents=True, exist_ok=True)
        if not self._is_mounted(mountpoint):
            _run_while_busy(["zfs", "mount", dataset])

    def _destroy(self, dataset: str, *, mounted: bool) -> None:
        if mounted:
            process.run(["zfs", "unmount", dataset], timeout=_TIMEOUT, ok_codes=(0, 1))
        # Its snapshots go with it (snapvol's own dataset); a dependent clone makes this fail.
        if self._lzc is not None:
            snapshot_names = [f"{dataset}@{s}" for s in self._snapshots(dataset, "")]
            self._release_all(snapshot_names)        # the volume goes: so do its bases
            try:
                snaps = [s.encode() for s in snapshot_names]
                if snaps:
                    self._lzc.lzc_destroy_snaps(snaps, defer=False)
                self._lzc.lzc_destroy(dataset.encode())
            except Exception as exc:
                raise lzc_failed(f"cannot destroy dataset {dataset}", exc) from None
        else:
            _run_while_busy(["zfs", "destroy", "-r", dataset])
        mountpoint = self.mount_base / dataset.rsplit("/", 1)[1]
        try:
            mountpoint.rmdir()
        except OSError:
            pass

    @staticmethod
    def _is_mounted(mountpoint: Path) -> bool:
        return mounted_filesystem(mountpoint) is not None

    def _require_healthy(self) -> None:
        try:
            if self._get(self.root, ["type"], missing_ok=True) is None:
                raise BackendUnavailable(f"parent dataset {self.root} is gone")
        except CommandFailed as exc:
            raise BackendUnavailable(f"zfs root {self.root} is not usable: {exc}") from None
