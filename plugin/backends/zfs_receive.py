"""Receiving ZFS streams into volumes: the ``recv:`` inboxes, resume tokens, ``zfs receive``.

A full stream for volume ``<name>`` is received into the inbox ``<root>/recv:<name>`` (``:``
never occurs in a volume name, so the name alone says whose it is), marked "creating" and only
then renamed to ``<root>/<name>``: a crash at any point leaves either that inbox, which
start-up destroys (or keeps for a resume, with its token, on OpenZFS), or a "creating" dataset,
which start-up destroys too. An incremental stream goes into the volume's own dataset, where
ZFS applies it atomically at the end of the stream, or not at all.

On OpenZFS a receive is resumable (``zfs receive -s``): an interrupted one leaves its state in
the inbox (full) or the dataset (incremental), :meth:`Receiver.resume_token` gives the token,
and a stream from ``zfs send -t`` received with *resume* completes it. A new stream for the
volume drops such a state first, and so does a stream that ``zfs receive`` itself refused (a
damaged one: sent again whole, not resumed).

A failed receive is undone whatever the stream's format: ``zfs receive`` destroys what it made
when it fails (zfs-fuse checks a stream's checksum only at its END record, and applies records
before that, into the inbox or a temporary clone), and a stream refused *after* zfs took it
whole (format 3 relays the native stream unheld, so its envelope's end mark is read last) is
undone here: the inbox destroyed, or the volume rolled back to the stream's base.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import BinaryIO

from .. import names, process
from ..errors import BackendError, PluginError, SnapshotExists, VolumeExists
from .zfs_commands import ZfsCommands
from .zfs_layout import OWNER, Layout

log = logging.getLogger(__name__)

INBOX = "recv:"                  # <root>/recv:<name>: a full stream being received for <name>
_RECEIVE_TIMEOUT = 600.0          # to finish after the last byte of a stream


class Receiver:
    """Streams into the volumes of *layout* (the caller holds the volume lock)."""

    def __init__(self, zfs: ZfsCommands, layout: Layout) -> None:
        self._zfs = zfs
        self._layout = layout

    def inbox(self, volume: str) -> str:
        return f"{self._layout.root}/{INBOX}{names.stored_volume_name(volume)}"

    def token(self, dataset: str) -> str | None:
        """The resume token an interrupted receive left in *dataset*, if any (OpenZFS)."""
        if not self._zfs.resumable:
            return None
        props = self._zfs.get(dataset, ["receive_resume_token"], missing_ok=True)
        token = (props or {}).get("receive_resume_token", "-")
        return None if token in ("-", "") else token

    def resume_token(self, volume: str) -> str | None:
        """The state of an interrupted resumable receive into *volume* (OpenZFS), if any."""
        for dataset in (self._layout.dataset(volume), self.inbox(volume)):   # incremental, full
            token = self.token(dataset)
            if token:
                return token
        return None

    def drop_inbox(self, inbox: str, *, keep_resumable: bool) -> None:
        """Destroy the inbox of a full receive that did not finish (unless, with
        *keep_resumable*, OpenZFS kept its state for a resume). Failing to destroy it is
        logged: the next start tries again."""
        if self._zfs.get(inbox, ["type"], missing_ok=True) is None:
            return
        if keep_resumable and self.token(inbox):
            log.info("keeping the interrupted receive %s for a resume", inbox)
            return
        log.info("destroying %s, left by an interrupted receive", inbox)
        try:
            if self.token(inbox):
                self._zfs.abort_receive(inbox)
            if self._zfs.get(inbox, ["type"], missing_ok=True) is not None:
                self._layout.destroy(inbox, mounted=False)
        except BackendError as exc:
            log.error("could not destroy %s: %s", inbox, exc)

    @contextmanager
    def receiving(self, volume: str, snapshot: str, base: str | None,
                  options: Mapping[str, str], *, resume: bool = False) -> Iterator[BinaryIO]:
        """:meth:`Backend.receiving <plugin.backends.base.Backend.receiving>` on ZFS
        (``zfs receive -u``; an incremental stream with ``-F``: local changes since the last
        snapshot are discarded)."""
        dataset = self._layout.dataset(volume)
        names.snapshot_name(snapshot)
        if base is None:
            if self._zfs.get(dataset, [OWNER], missing_ok=True) is not None:
                raise VolumeExists(f"volume {volume} already exists; a full stream makes a new "
                                   "volume (remove it, or send an incremental stream)")
            target = self.inbox(volume)
            if not (resume and self.token(target)):
                self.drop_inbox(target, keep_resumable=False)
        else:
            target = dataset
            if self.token(dataset) and not resume:
                log.info("dropping the interrupted receive into %s", dataset)
                self._zfs.abort_receive(dataset)
            self._layout.owned_snapshot(volume, base)
            if snapshot in self._layout.snapshots(dataset, volume):
                raise SnapshotExists(f"snapshot {volume}@{snapshot} already exists")
            # unmounted while it changes underneath (zfs-fuse would keep serving stale
            # content); the caller made sure no container uses it
            if self._layout.is_mounted(self._layout.mountpoint(volume)):
                self._zfs.unmount(dataset)
        argv = self._zfs.receive_argv(target, force=base is not None and not resume)
        refused = False      # by zfs receive itself (not a stream cut short): no resume then
        try:
            with process.Streaming(argv, feed=True) as child:
                try:
                    yield child.proc.stdin   # type: ignore[misc]
                except BrokenPipeError:
                    # it stopped reading: its status and stderr say why (a stream that fails
                    # its checksum, or is none), not the broken pipe
                    refused = True
                    child.finish(timeout=_RECEIVE_TIMEOUT)
                    raise
                except BaseException:
                    # let it see the end of its input and finish by itself: it then fails (and
                    # saves its state for a resume, on OpenZFS), or completes on a native
                    # stream that was whole (an envelope refused at its end mark), which is
                    # undone below; killed, it might complete after that (zfs-fuse's daemon)
                    child.close_input_and_wait(timeout=60.0)
                    raise
                refused = True
                child.finish(timeout=_RECEIVE_TIMEOUT)
        except BaseException:
            # nothing half-made; an interrupted stream's state is kept for a resume (OpenZFS),
            # but not what the receiver itself refused (a damaged stream starts again)
            keep = self._zfs.resumable and not refused
            if base is None:
                self.drop_inbox(target, keep_resumable=keep)
            else:
                self._drop_unaccepted(dataset, volume, base, snapshot, keep_resumable=keep)
            raise
        finally:
            if base is not None:
                self._zfs.mount(dataset, self._layout.mountpoint(volume))
        if base is not None:
            log.info("received %s@%s (incremental)", volume, snapshot)
            return
        self._adopt(target, volume, options)
        log.info("received %s@%s (full)", volume, snapshot)

    def _drop_unaccepted(self, dataset: str, volume: str, base: str, snapshot: str, *,
                         keep_resumable: bool) -> None:
        """A failed incremental receive must leave the volume at *base*: zfs-fuse has been
        seen to answer "I/O error" with the snapshot made, and a stream whose envelope failed
        its check after the native stream was whole (format 3 relays it unheld) was applied
        by zfs; either way it was never accepted, so the volume goes back to *base* (which
        also destroys the snapshot). The state of a refused resumable receive goes too."""
        try:
            if not keep_resumable and self.token(dataset):
                log.info("dropping the refused receive's state in %s", dataset)
                self._zfs.abort_receive(dataset)
            if snapshot in self._layout.snapshots(dataset, volume):
                log.warning("the failed receive left %s@%s; back to %s", volume, snapshot, base)
                self._zfs.rollback(f"{dataset}@{base}")
        except PluginError as exc:
            log.error("could not check for or remove %s@%s after a failed receive: %s",
                      volume, snapshot, exc)

    def _adopt(self, inbox: str, volume: str, options: Mapping[str, str]) -> None:
        """Make the completely received *inbox* the volume *volume*, all or nothing."""
        dataset = self._layout.dataset(volume)
        try:
            self._zfs.set(inbox, OWNER, "creating")          # from here on start-up knows it
            self._zfs.rename(inbox, dataset)
            for prop, value in self._layout.properties(volume, options).items():
                self._zfs.set(dataset, prop, value)
            self._zfs.mount(dataset, self._layout.mountpoint(volume))
            self._zfs.set(dataset, OWNER, "snapvol")        # the commit point
        except BaseException:
            try:
                self.drop_inbox(inbox, keep_resumable=False)
                if (self._zfs.get(dataset, [OWNER], missing_ok=True) or {}).get(OWNER) == "creating":
                    self._layout.destroy(dataset, mounted=True)
            except BackendError as cleanup:
                log.error("could not remove half-received %s (removed at next start): %s",
                          dataset, cleanup)
            raise
