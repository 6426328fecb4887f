"""How snapvol reaches ZFS: for each primitive, libzfs_core or the ``zfs`` CLI, decided here.

The strategy. libzfs_core (Debian's ``python3-pyzfs``; OpenZFS with ``/dev/zfs``) is the
stable ioctl interface: it takes lists, so one ``lzc_snapshot`` snapshots several datasets
in one transaction group (atomically), it reports failures with an errno instead of a
sentence, and it has user holds. Where it is loaded it therefore creates, clones and destroys
datasets, takes and destroys snapshots, and holds and releases them. The CLI does the rest,
which libzfs_core cannot do:

* listing and reading properties (``zfs get -H -p``, one call for a whole level of the
  tree) and setting them on an existing dataset: upstream libzfs_core has no such calls
  (pyzfs marks ``lzc_list``, ``lzc_get_props`` and ``lzc_set_props`` "uncommitted": they
  need functions it lacks); the native properties of a new dataset are set with
  ``zfs set`` too, which parses ``16K`` or ``lz4`` as users write them, where
  ``lzc_create`` would want native values (user properties, plain strings, go to it);
* mounting, unmounting, renaming and promoting (libzfs, not libzfs_core), and
  ``rollback -r`` (``lzc_rollback`` only goes back to the latest snapshot);
* send and receive, as children whose pipe carries the stream (:mod:`.zfs_receive`).

zfs-fuse (pool version 23, no ``/dev/zfs``) has no libzfs_core: there the CLI does
everything, which costs the atomic multi-volume snapshot, holds (its ``zfs holds`` is
broken anyway) and resumable receives; the capability attributes of :class:`ZfsCommands`
say which are there.

Errors keep what ZFS said: a failed libzfs_core call becomes :func:`lzc_failed`'s
:class:`~plugin.errors.BackendError` with the errno (as the attribute and by name in the
message), a failed command a :class:`~plugin.errors.CommandFailed` with its stderr.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import process
from ..errors import BackendError, BackendUnavailable, CommandFailed, InvalidOption
from ..mountinfo import mounted_filesystem

log = logging.getLogger(__name__)

HOLD_TAG = "snapvol-replication"
TIMEOUT = 120.0
_BUSY_WAIT = 10.0
_ZFS_FUSE_COMPRESSION = frozenset(["on", "off", "lzjb", "gzip", "zle"]
                                  + [f"gzip-{n}" for n in range(1, 10)])
_MISSING = re.compile(r"dataset does not exist|no such (pool|dataset)")


def load_libzfs_core() -> Any | None:
    """The ``libzfs_core`` module when OpenZFS's kernel interface is usable, else ``None``."""
    if not os.path.exists("/dev/zfs"):
        return None
    try:
        import libzfs_core  # type: ignore[import-not-found]  # Debian's python3-pyzfs
    except ImportError:
        return None
    return libzfs_core


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


def run_while_busy(argv: list[str]) -> None:
    """Run a zfs command, retrying for a while as long as it fails with "busy": zfs-fuse
    releases an unmounted dataset asynchronously, so destroy or mount right after an unmount
    can fail for a moment."""
    deadline = time.monotonic() + _BUSY_WAIT
    while True:
        try:
            process.run(argv, timeout=TIMEOUT)
            return
        except CommandFailed as exc:
            if "busy" not in exc.stderr or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _unmount_before_destroy(dataset: str) -> None:
    """Unmount *dataset* (not mounted is fine), retrying a while as long as it is busy.

    :raises CommandFailed: it stays busy (a process sits in it). Destroying must stop here:
        libzfs_core destroys the snapshots before the dataset, so going on would leave a
        refused Remove with the volume's snapshots gone.
    """
    deadline = time.monotonic() + _BUSY_WAIT
    while True:
        result = process.run(["zfs", "unmount", dataset], timeout=TIMEOUT, ok_codes=(0, 1))
        if result.returncode == 0 or "busy" not in result.stderr:
            return              # unmounted, or not mounted; anything else: destroy says why
        if time.monotonic() > deadline:
            raise CommandFailed(result.argv, result.returncode, result.stderr)
        time.sleep(0.1)


class ZfsCommands:
    """The ZFS primitives snapvol uses, through libzfs_core (*lzc*, or ``None``) or the CLI.

    Datasets and snapshots are full names (``pool/a/b``, ``pool/a/b@s``); nothing here knows
    volumes or ownership. Every method raises :class:`BackendError` (``CommandFailed`` for
    the CLI) unless it says otherwise.
    """

    def __init__(self, lzc: Any | None) -> None:
        self._lzc = lzc
        self.libzfs_core = lzc is not None
        self.atomic_snapshots = lzc is not None   # lzc_snapshot takes a list; zfs-fuse's CLI one name
        self.holds = lzc is not None              # user holds through libzfs_core only
        self.resumable = lzc is not None          # OpenZFS: receive -s; zfs-fuse has no resume

    # ------------------------------------------------------------------ the pool

    def pools(self) -> list[str]:
        return process.run(["zpool", "list", "-H", "-o", "name"], timeout=TIMEOUT).stdout.split()

    def implementation(self) -> str:
        """"zfs-fuse", or "OpenZFS <userland> (module <kernel>)".

        :raises BackendUnavailable: userland and kernel module versions differ (OpenZFS
            refuses some ioctls across versions).
        """
        if not os.path.exists("/dev/zfs"):
            return "zfs-fuse"
        out = process.run(["zfs", "version"], timeout=TIMEOUT, ok_codes=(0, 1, 2)).stdout
        versions = re.findall(r"^zfs(-kmod)?-(\S+)", out, re.M)
        user = next((v for kmod, v in versions if not kmod), None)
        kernel = next((v for kmod, v in versions if kmod), None)
        if user and kernel and user.split("-")[0] != kernel.split("-")[0]:
            raise BackendUnavailable(f"zfs userland {user} and kernel module {kernel} differ; "
                                     "install matching versions (or reboot into the new module)")
        return f"OpenZFS {user} (module {kernel})"

    def compressions(self, pool: str) -> frozenset[str]:
        """The ``compression`` values datasets of *pool* accept."""
        if not os.path.exists("/dev/zfs"):
            return _ZFS_FUSE_COMPRESSION          # zfs-fuse (pool version 23): no lz4, no zstd
        found = set(_ZFS_FUSE_COMPRESSION)
        features = process.run(["zpool", "get", "-H", "-o", "property,value",
                                "feature@lz4_compress,feature@zstd_compress", pool],
                               timeout=TIMEOUT, ok_codes=(0, 1)).stdout
        for line in features.splitlines():
            prop, _, value = line.partition("\t")
            if value in ("enabled", "active"):
                if prop == "feature@lz4_compress":
                    found.add("lz4")
                elif prop == "feature@zstd_compress":
                    found |= {"zstd", "zstd-fast"} | {f"zstd-{n}" for n in range(1, 20)}
        return frozenset(found)

    # ------------------------------------------------------------------ properties (CLI)

    def get(self, dataset: str, props: list[str], *, missing_ok: bool = False) -> dict[str, str] | None:
        """*props* of *dataset* (machine-readable values); ``None`` if it does not exist and
        *missing_ok*."""
        try:
            out = process.run(["zfs", "get", "-H", "-p", "-o", "property,value", ",".join(props),
                               dataset], timeout=TIMEOUT).stdout
        except CommandFailed as exc:
            if missing_ok and _MISSING.search(exc.stderr):
                return None
            raise
        return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)

    def get_with_children(self, dataset: str, props: list[str]) -> dict[str, dict[str, str]]:
        """*props* of *dataset* and of its children and snapshots, one level down, in one call
        (snapshots in creation order)."""
        return self.get_below(dataset, props, depth=1)

    def get_below(self, dataset: str, props: list[str], *, depth: int) -> dict[str, dict[str, str]]:
        """*props* of *dataset* and of what lies *depth* levels below it (a child's snapshots
        are one level below the child), in one call."""
        out = process.run(["zfs", "get", "-H", "-p", "-r", "-d", str(depth), "-o",
                           "name,property,value", ",".join(props), dataset], timeout=TIMEOUT).stdout
        found: dict[str, dict[str, str]] = {}
        for line in out.splitlines():
            name, prop, value = line.split("\t", 2)
            found.setdefault(name, {})[prop] = value
        return found

    def existing(self, datasets: list[str]) -> set[str]:
        """Which of *datasets* exist, in one ``zfs get`` (zfs lists those that do and
        exits 1 for the others)."""
        if not datasets:
            return set()
        result = process.run(["zfs", "get", "-H", "-o", "name", "type", *datasets],
                             timeout=TIMEOUT, ok_codes=(0, 1))
        if result.returncode and not _MISSING.search(result.stderr):
            raise CommandFailed(result.argv, result.returncode, result.stderr)
        return set(result.stdout.splitlines()) & set(datasets)

    def snapshots(self, dataset: str) -> dict[str, dict[str, str]]:
        """The snapshots of *dataset* (the part after ``@``), oldest first, with their
        ``creation`` and ``guid``."""
        return {name.split("@", 1)[1]: props
                for name, props in self.get_with_children(dataset, ["creation", "guid"]).items()
                if name.startswith(dataset + "@")}

    def set(self, dataset: str, prop: str, value: str) -> None:
        process.run(["zfs", "set", f"{prop}={value}", dataset], timeout=TIMEOUT)

    def set_while_busy(self, dataset: str, prop: str, value: str) -> None:
        """:meth:`set` for a property whose change remounts (``mountpoint``): retried while
        zfs-fuse answers busy, as it may for a moment after an unmount."""
        run_while_busy(["zfs", "set", f"{prop}={value}", dataset])

    # ------------------------------------------------------------------ datasets

    def create(self, dataset: str, props: Mapping[str, str]) -> None:
        """:raises InvalidOption: (CLI) zfs refused a property or its value."""
        if self._lzc is not None:
            try:
                self._lzc.lzc_create(dataset.encode(), props=_user_properties(props))
            except Exception as exc:            # pyzfs raises its own ZFSError tree
                raise lzc_failed(f"cannot create dataset {dataset}", exc) from None
            self._set_native(dataset, props)
            return
        try:
            process.run(["zfs", "create", *_options(props), dataset], timeout=TIMEOUT)
        except CommandFailed as exc:
            if "property" in exc.stderr or "invalid" in exc.stderr:
                raise InvalidOption(f"zfs refused the options: {exc.stderr.strip()}") from None
            raise

    def create_parent(self, dataset: str) -> None:
        """*dataset* and its missing parents, never mounted (a container of volumes)."""
        process.run(["zfs", "create", "-p", "-o", "mountpoint=none", "-o", "canmount=off",
                     dataset], timeout=TIMEOUT)

    def clone(self, origin: str, dataset: str, props: Mapping[str, str]) -> None:
        if self._lzc is not None:
            try:
                self._lzc.lzc_clone(dataset.encode(), origin.encode(), props=_user_properties(props))
            except Exception as exc:
                raise lzc_failed(f"cannot clone {origin}", exc) from None
            self._set_native(dataset, props)
            return
        process.run(["zfs", "clone", *_options(props), origin, dataset], timeout=TIMEOUT)

    def _set_native(self, dataset: str, props: Mapping[str, str]) -> None:
        for prop, value in props.items():
            if ":" not in prop:
                self.set(dataset, prop, value)

    def destroy(self, dataset: str, *, mounted: bool) -> None:
        """Destroy *dataset* with its own snapshots, releasing snapvol's holds on them. Never
        ``-R``: a clone of one of them makes this fail rather than go too."""
        if mounted:
            _unmount_before_destroy(dataset)
        if self._lzc is None:
            run_while_busy(["zfs", "destroy", "-r", dataset])
            return
        snapshot_names = [f"{dataset}@{s}" for s in self.snapshots(dataset)]
        self.release(snapshot_names)        # the dataset goes: so do its replication bases
        try:
            if snapshot_names:
                self._lzc.lzc_destroy_snaps([s.encode() for s in snapshot_names], defer=False)
            self._lzc.lzc_destroy(dataset.encode())
        except Exception as exc:
            raise lzc_failed(f"cannot destroy dataset {dataset}", exc) from None

    def rename(self, dataset: str, new_name: str) -> None:
        """Rename *dataset*, retried while zfs-fuse answers busy (as it may right after an
        unmount). A retry that finds *dataset* gone and *new_name* there is done: zfs-fuse
        can answer busy for a rename it made, when only the remount after it failed."""
        try:
            run_while_busy(["zfs", "rename", dataset, new_name])
        except CommandFailed as exc:
            if ("does not exist" not in exc.stderr or self.get(dataset, ["type"], missing_ok=True)
                    or self.get(new_name, ["type"], missing_ok=True) is None):
                raise
            log.warning("zfs rename %s %s: done, though zfs answered: %s", dataset, new_name,
                        exc.stderr.strip())

    def promote(self, clone: str) -> None:
        process.run(["zfs", "promote", clone], timeout=TIMEOUT)

    def mount(self, dataset: str, mountpoint: Path) -> None:
        """Mount *dataset* (its ``mountpoint`` property is *mountpoint*) unless something is
        mounted there already."""
        mountpoint.mkdir(parents=True, exist_ok=True)
        if mounted_filesystem(mountpoint) is None:
            run_while_busy(["zfs", "mount", dataset])

    def unmount(self, dataset: str) -> None:
        run_while_busy(["zfs", "unmount", dataset])

    # ------------------------------------------------------------------ snapshots

    def snapshot(self, snapshots: list[str], action: str) -> None:
        """Take *snapshots* (``dataset@name``): in one transaction group with libzfs_core;
        the CLI takes one at a time (``atomic_snapshots``). *action* starts the error."""
        if self._lzc is not None:
            try:
                self._lzc.lzc_snapshot([s.encode() for s in snapshots])
            except Exception as exc:
                raise lzc_failed(action, exc) from None
        else:
            process.run(["zfs", "snapshot", *snapshots], timeout=TIMEOUT)

    def destroy_snapshot(self, snapshot: str, action: str) -> None:
        if self._lzc is not None:
            try:
                self._lzc.lzc_destroy_snaps([snapshot.encode()], defer=False)
            except Exception as exc:
                raise lzc_failed(action, exc) from None
        else:
            run_while_busy(["zfs", "destroy", snapshot])

    def rollback(self, snapshot: str) -> None:
        """Roll its dataset back to *snapshot*, destroying newer snapshots (``-r``).

        :raises CommandFailed: e.g. a clone of a newer snapshot exists (stderr names it).
        """
        process.run(["zfs", "rollback", "-r", snapshot], timeout=TIMEOUT)

    def is_held(self, snapshot: str) -> bool:
        """Whether snapvol holds *snapshot* (always false without ``holds``)."""
        if self._lzc is None:
            return False
        try:
            return HOLD_TAG.encode() in self._lzc.lzc_get_holds(snapshot.encode())
        except Exception as exc:
            raise lzc_failed(f"cannot read the holds of {snapshot}", exc) from None

    def hold(self, snapshot: str, action: str) -> None:
        """snapvol's user hold on *snapshot* (idempotent; a no-op without ``holds``)."""
        if self._lzc is None:
            return
        try:
            if HOLD_TAG.encode() not in self._lzc.lzc_get_holds(snapshot.encode()):
                self._lzc.lzc_hold({snapshot.encode(): HOLD_TAG.encode()})
        except Exception as exc:
            raise lzc_failed(action, exc) from None

    def release(self, snapshots: list[str]) -> None:
        """Drop snapvol's hold from each of *snapshots* (missing holds are fine)."""
        if self._lzc is None or not snapshots:
            return
        try:
            self._lzc.lzc_release({s.encode(): [HOLD_TAG.encode()] for s in snapshots})
        except Exception as exc:
            raise lzc_failed("cannot release snapvol's holds", exc) from None

    # ------------------------------------------------------------------ streams (CLI)

    def send_argv(self, snapshot: str, base: str | None, *,
                  resume_token: str | None = None) -> list[str]:
        """``zfs send`` of *snapshot*, incremental from *base* (a snapshot name, no dataset),
        or the rest of an interrupted stream given its *resume_token*.

        :raises InvalidOption: the token is not what ``receive_resume_token`` looks like.
        """
        if resume_token is not None:
            if not re.fullmatch(r"[0-9a-f-]{1,8192}", resume_token):
                raise InvalidOption("a resume token is hexadecimal, as `zfs get receive_resume_token` shows it")
            return ["zfs", "send", "-t", resume_token]
        if base is None:
            return ["zfs", "send", snapshot]
        return ["zfs", "send", "-i", f"@{base}", snapshot]

    def receive_argv(self, dataset: str, *, force: bool) -> list[str]:
        """``zfs receive`` into *dataset*, never mounting it; resumable (``-s``) where it can
        be; with *force* (``-F``) local changes since the last snapshot are discarded."""
        return ["zfs", "receive", *(["-s"] if self.resumable else []), "-u",
                *(["-F"] if force else []), dataset]

    def abort_receive(self, dataset: str) -> None:
        """Drop the state an interrupted resumable receive left in *dataset*."""
        process.run(["zfs", "receive", "-A", dataset], timeout=TIMEOUT)


def _user_properties(props: Mapping[str, str]) -> dict[bytes, bytes]:
    """The ``module:property`` ones, which lzc_create and lzc_clone take as strings."""
    return {k.encode(): v.encode() for k, v in props.items() if ":" in k}


def _options(props: Mapping[str, str]) -> list[str]:
    return [arg for prop, value in props.items() for arg in ("-o", f"{prop}={value}")]
