"""Transfers: a volume as a framed stream (send), and a stream into a volume (receive).

A send pins the snapshots it reads (retention and rollback leave them alone) and holds no
volume lock while it streams, so Docker's calls go on; a receive marks its volume (no Mount,
no second receive) and publishes nothing until the whole stream checked out. Both hold one of
the bounded transfer slots (:class:`~plugin.inflight.InFlight`). ``replication`` drives these
two across hosts.
"""

from __future__ import annotations

import io
import logging
import socket
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, BinaryIO

from . import compression as compressions, names, options, splicing, stream
from .client import kernel_mover
from .backends.base import Backend
from .errors import (CommandFailed, InvalidName, InvalidOption, InvalidRequest, PluginError, SnapshotNotFound,
                     VolumeInUse, VolumeNotFound)
from .history import ReplicationLog
from .inflight import InFlight
from .lifecycle import Lifecycle
from .locks import VolumeLocks
from .mounts import MountTable
from . import process
from .process import Streaming
from .snapshot_names import SEND_PREFIX, unique_name
from .units import rfc3339
from .volumes import VolumeService

log = logging.getLogger(__name__)


class Transfers:
    """Send and receive for the volumes of *volumes*, within *inflight*'s slots."""

    def __init__(self, volumes: VolumeService, backend: Backend, mounts: MountTable,
                 locks: VolumeLocks, inflight: InFlight, lifecycle: Lifecycle,
                 replications: ReplicationLog | None = None) -> None:
        """*replications* names the snapshots replication targets build on (their ZFS holds
        are kept while any target needs them)."""
        self._volumes = volumes
        self._backend = backend
        self._mounts = mounts
        self._locks = locks
        self._inflight = inflight
        self._lifecycle = lifecycle
        self._replications = replications
        # set by the standby roles (plugin.standby), above this module: called with the
        # volume and the stream's header before anything is received (may refuse), and
        # after the stream was received whole
        self.admit: Callable[[str, dict[str, Any]], None] | None = None
        self.admitted: Callable[[str, dict[str, Any]], None] | None = None

    def send(self, volume: object, snapshot: object = None, since: object = None, *,
             holding_slot: bool = False, resume_token: str | None = None,
             role: dict[str, Any] | None = None, compression: object = None,
             format: int | None = None, check: str | None = None) -> Transfer:
        """The framed stream of *volume*@*snapshot* (a snapshot taken now when None),
        incremental from *since*, as a :class:`Transfer` to iterate (and close). A snapshot
        taken here is the newest ``send-`` one once its stream is complete (the older ones
        go then, see :mod:`plugin.lifecycle`), and is removed again if the send fails.

        Only choosing the snapshots takes the volume's lock; while the stream runs, they are
        pinned (retention skips them) and no lock is held, so Docker's calls go on.

        *compression* (``"zstd"``) compresses the native stream (:mod:`plugin.compression`);
        *format* None: 3 for a backend whose native streams check themselves
        (``checked_streams``) when not compressed, else 2; 2 makes a stream that a snapvol
        reading formats 1 and 2 only reads, 1 one that snapvol 0.2 reads (no compression
        there); *check* (``"crc32"``) a format 2 stream that a receiver without
        python3-xxhash reads.

        :raises VolumeNotFound, SnapshotNotFound: as named.
        :raises VolumeBusy: as many transfers as allowed are already running (unless the
            caller holds a slot of :meth:`InFlight.slot` already).
        """
        volume = names.volume_name(volume)
        since = None if since is None else names.snapshot_name(since)
        if check is not None and check not in stream.CHECKS:
            raise InvalidRequest(f"unknown stream check {check!r}: use " + " or ".join(stream.CHECKS))
        packed = compressions.compression(compression)
        packing = _Packing(packed, _format(format, self._backend.checked_streams and packed is None),
                           check)
        if snapshot is not None:
            return self._start(volume, names.snapshot_name(snapshot), since, holding_slot,
                               resume_token, lambda complete: None, role, packing)
        taken = self._volumes.snapshot([volume], unique_name(SEND_PREFIX))[0].name

        def retire(complete: bool) -> None:
            if complete:
                self._lifecycle.retire_older(volume, taken, f"a newer send ({taken}) completed")
            else:
                self._lifecycle.retire(volume, [taken], "taken for a send that failed")
        try:
            return self._start(volume, taken, since, holding_slot, resume_token, retire, role,
                               packing)
        except PluginError:
            retire(False)
            raise

    def _start(self, volume: str, snapshot: str, since: str | None, holding_slot: bool,
               resume_token: str | None, finished: Callable[[bool], None],
               role: dict[str, Any] | None = None, packing: _Packing | None = None) -> Transfer:
        """Check, pin and take a slot under the volume's lock; *finished* runs after the
        stream ends (with whether it was whole), once the pins and the slot are released."""
        with self._locks.hold(volume):
            info = self._backend.volume(volume)
            by_name = {s.name: s for s in self._backend.snapshots(volume)}
            for wanted in (snapshot, since):
                if wanted is not None and wanted not in by_name:
                    raise SnapshotNotFound(volume, wanted)
            if since is not None and by_name[since].created > by_name[snapshot].created:
                raise InvalidRequest(f"--since {since} is newer than {snapshot}")
            argv = self._backend.send_argv(volume, snapshot, since, resume_token=resume_token)
            if not holding_slot:
                self._inflight.acquire_slot()
            pinned = [(volume, n) for n in (snapshot, since) if n is not None]
            self._inflight.pin(pinned)
        header = {"backend": self._backend.kind, "volume": volume, "snapshot": snapshot,
                  "identity": by_name[snapshot].identity, "created": rfc3339(by_name[snapshot].created),
                  "base": since, "base_identity": by_name[since].identity if since else None,
                  "base_received": by_name[since].received if since else None,
                  "options": dict(info.options), "resume": resume_token is not None}
        if role is not None:
            header["role"] = role
        packing = packing or _Packing(None, stream.FORMAT, None)
        if packing.compression:
            header["compression"] = packing.compression
        if packing.check and packing.format == 2:
            header["check"] = packing.check

        def done(complete: bool) -> None:
            self._inflight.unpin(pinned)
            if not holding_slot:
                self._inflight.release_slot()
            finished(complete)
        return Transfer(header, argv, done, compression=packing.compression, format=packing.format)

    def move_base(self, volume: str, new: str, old: str | None) -> None:
        """A replication target now holds *new*: hold it, and release *old* unless another
        target still builds on it (ZFS user holds; no-ops on Btrfs)."""
        with self._locks.hold(volume):
            self._backend.hold(volume, new)
            bases = self._replications.bases(volume) if self._replications else set()
            if old and old != new and old not in bases:
                try:
                    self._backend.release(volume, old)
                except PluginError as exc:
                    log.warning("could not release %s@%s: %s", volume, old, exc)

    def slot(self) -> AbstractContextManager[None]:
        """Hold one transfer slot for a block (a replication, for its whole run).

        :raises VolumeBusy: all slots are taken.
        """
        return self._inflight.slot()

    def receive(self, volume: object, source: Any, *, idle: float = 120.0) -> dict[str, Any]:
        """Read a framed stream from *source* (a binary file) into *volume*: a new volume from
        a full stream, the replica brought up to date by an incremental one. A format 3 stream
        from a socket (a buffered reader of it) goes on to the native receiver by splice(2);
        *idle*: seconds the socket may then stay silent.

        The stream is checked before anything is published: a truncated, corrupted or
        aborted stream, one for the other backend, or an incremental one whose base the
        replica lacks is refused and leaves nothing behind.

        :raises StreamRefused: the stream is bad or does not fit this replica.
        :raises VolumeExists: a full stream for an existing volume.
        :raises VolumeInUse: containers use the replica an incremental stream would change.
        """
        volume = names.volume_name(volume)
        reader = stream.Reader(source)
        try:
            header = reader.header()
        except stream.StreamError as exc:
            raise StreamRefused(str(exc)) from None
        if header.get("backend") != self._backend.kind:
            raise StreamRefused(f"the stream is from a {header.get('backend')} volume; this "
                                f"plugin stores volumes on {self._backend.kind}")
        if reader.format == stream.NATIVE and not self._backend.checked_streams:
            # format 3 has no check of ours: only a receiver that checks every byte may take it
            raise StreamRefused(f"the stream (format 3) relies on the native receiver's checks, "
                                f"which {self._backend.kind} here does not make; send format 2")
        try:
            snapshot = names.snapshot_name(header.get("snapshot"))
            opts = options.validate({k: v for k, v in (header.get("options") or {}).items()
                                     if k in options.REPLICA_OPTIONS},
                                    self._backend.kind, self._backend.compressions)
        except (InvalidName, InvalidOption) as exc:
            raise StreamRefused(f"the stream's header is not acceptable: {exc}") from None
        try:
            packed = compressions.compression(header.get("compression"))
        except InvalidRequest:
            raise StreamRefused(f"the stream is compressed with {header.get('compression')!r}, "
                                "which this snapvol cannot decompress") from None
        resume = header.get("resume") is True
        if resume and not self._backend.resumable:
            raise StreamRefused(f"the stream resumes an interrupted transfer; {self._backend.kind} "
                                "here cannot resume (send the whole stream again)")
        with self._inflight.receiving_into(volume):
            if self.admit is not None:
                self.admit(volume, header)
            base = self._replica_base(volume, header)   # after the mark: no Mount slips in
            try:
                with self._backend.receiving(volume, snapshot, base, opts, resume=resume) as pipe, \
                        _unpacked(packed, pipe) as sink:
                    if reader.format == stream.NATIVE:
                        _relay(reader, source, sink, idle)
                    else:
                        for chunk in stream.prefetch(reader.data(hold_last=True)):
                            sink.write(chunk)
            except stream.StreamError as exc:
                raise StreamRefused(f"{exc}; nothing was kept") from None
            except CommandFailed as exc:
                if reader.format != stream.NATIVE:
                    raise
                # format 3: the native receiver is the one that checks the data
                raise StreamRefused(f"the native receiver refused the stream (damaged, or not "
                                    f"a {self._backend.kind} stream): {exc}; nothing was kept") from None
            except (BrokenPipeError, ConnectionError) as exc:
                raise StreamRefused(f"the receiver stopped early ({exc}); nothing was kept") from None
            if self.admitted is not None:
                self.admitted(volume, header)
        self._volumes.known.add(volume)
        log.info("received %s@%s: %d bytes (%s)", volume, snapshot, reader.bytes,
                 "incremental from " + base if base else "full")
        # a replica keeps what its source keeps: the newest send-/repl- snapshot of each kind
        self._lifecycle.retire_older(volume, snapshot, f"replaced by {snapshot}, received")
        return {"volume": volume, "snapshot": snapshot, "base": base, "bytes": reader.bytes}

    def resume_token(self, volume: object) -> str | None:
        """The token of an interrupted receive into *volume*, where the backend can resume."""
        return self._backend.resume_token(names.volume_name(volume))

    def _replica_base(self, volume: str, header: dict[str, Any]) -> str | None:
        """The replica's snapshot an incremental stream builds on (None for a full stream)."""
        wanted = header.get("base_identity")
        if not wanted:
            return None
        try:
            have = self._backend.snapshots(volume)
        except VolumeNotFound:
            raise StreamRefused(f"the stream is incremental (from {header.get('base')}) but "
                                f"there is no volume {volume} here to apply it to; send a full "
                                "stream first") from None
        users = self._mounts.users(volume)
        if users:
            raise VolumeInUse(f"volume {volume} is in use by {self._volumes.users_text(volume, users)}; "
                              "a replica cannot be updated while containers use it")
        also = header.get("base_received") or None   # the sender's base was received from it
        for snap in reversed(have):
            if snap.matches(str(wanted)) or (also and snap.matches(str(also))):
                return snap.name
        raise StreamRefused(f"volume {volume} lacks the stream's base snapshot "
                            f"{header.get('base')} (identity {str(wanted)[:12]}); send from a "
                            "snapshot both sides have, or a full stream to a new volume")


class StreamRefused(InvalidRequest):
    """A stream that cannot be received here (bad, for the other backend, missing its base)."""


@dataclass(frozen=True)
class _Packing:
    compression: str | None
    format: int
    check: str | None


def _format(raw: object, native: bool) -> int:
    """The stream format asked for (None: the best one here; *native*: format 3 is allowed)."""
    if raw is None:
        return stream.NATIVE if native else stream.FORMAT
    if raw not in stream.FORMATS or isinstance(raw, bool):
        raise InvalidRequest(f"unknown stream format {raw!r}: use "
                             + " or ".join(map(str, stream.FORMATS)))
    if raw == stream.NATIVE and not native:
        raise InvalidRequest("stream format 3 is for uncompressed streams that check themselves "
                             "(Btrfs, ZFS): use 1 or 2")
    return int(raw)  # type: ignore[call-overload]


def _relay(reader: stream.Reader, source: Any, sink: BinaryIO, idle: float) -> None:
    """A format 3 stream's data into *sink*: spliced from the socket under *source* where it
    is one (the stream socket's buffered reader; the HTTP body is not), else read and written.
    The structure is checked either way (:meth:`stream.Reader.relay`); the data is checked by
    the native receiver, and nothing is published before the end mark checked out."""
    move = kernel_mover(source, sink, idle, lambda moved: None) \
        if isinstance(source, io.BufferedReader) else None
    if move is not None:
        reader.relay(move)
        return
    for chunk in reader.data(hold_last=False):
        sink.write(chunk)


@contextmanager
def _unpacked(compression: str | None, pipe: BinaryIO) -> Iterator[BinaryIO]:
    """*pipe* (the native receiver's input), or the input of a decompressor that writes into
    it. A decompressor that fails refuses the stream (the CRCs passed: the sender compressed
    something bad), and one that stops early is blamed rather than the pipe it leaves broken."""
    if compression is None:
        yield pipe
        return
    pipe.flush()
    with process.Streaming(compressions.decompress_argv(compression), feed=True,
                           stdout=pipe.fileno()) as child:
        try:
            yield child.proc.stdin   # type: ignore[misc]
            child.finish(timeout=_UNPACK_TIMEOUT)
        except (BrokenPipeError, CommandFailed) as exc:
            try:
                child.finish(timeout=_UNPACK_TIMEOUT)
            except CommandFailed as failed:
                exc = failed
            if isinstance(exc, CommandFailed) and "pipe" in exc.stderr.lower():
                raise BrokenPipeError(f"{compression} -d: {exc.stderr.strip()[-200:]}") from None
            if isinstance(exc, CommandFailed):
                raise StreamRefused(f"the stream's {compression} data cannot be decompressed "
                                    f"({exc.stderr.strip()[-200:] or exc}); nothing was kept") from None
            raise


_UNPACK_TIMEOUT = 600.0


class Transfer:
    """A running send: iterate it for the framed stream; :meth:`close` (also called by the
    WSGI server when the client goes away) stops the native sender and frees its slot."""

    CHUNK = stream.FRAME

    def __init__(self, header: dict[str, Any], argv: list[str],
                 done: Callable[[bool], None], *, compression: str | None = None,
                 format: int = stream.FORMAT) -> None:
        """*done* is called once, with whether the whole stream was produced."""
        self.header = header
        self.bytes = 0                # what goes into the frames (compressed, if it is)
        self._argv = argv
        self._done: Callable[[bool], None] | None = done
        self._child: Any = None
        self._packer: Any = None
        self._compression = compression
        self._format = format
        self._complete = False

    def _native(self) -> Iterator[bytes]:
        self._child = Streaming(self._argv, feed=False)
        with self._child:
            out = self._child.proc.stdout
            if self._compression is not None:
                # native sender | compressor: we read the compressor; it owns the pipe now
                self._packer = Streaming(compressions.compress_argv(self._compression),
                                         feed=False, stdin=out.fileno())
                out.close()
                out = self._packer.proc.stdout
            with self._packer or nullcontext():
                while chunk := out.read(self.CHUNK):     # whole frames (a pipe gives 64 KiB reads)
                    self.bytes += len(chunk)
                    yield chunk
                if self._packer is not None:
                    self._packer.finish()   # first: a sender that failed ends its input early,
            self._child.finish()            # and it is the one to blame

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from stream.encode(self.header, stream.prefetch(self._native()), format=self._format)
            self._complete = True
        finally:
            self.close()

    def into(self, sock: socket.socket, *, timeout: float | None = None,
             progress: Callable[[int], None] | None = None) -> Iterator[bytes]:
        """The stream for *sock*, which must carry it as it is (no chunked HTTP encoding):
        the caller sends what this yields, in order, and this writes the rest into *sock*
        itself. Its first item is the stream's beginning, so a WSGI server sends its headers
        before anything is written here. An uncompressed format 3 stream yields only that: its
        data goes from the native sender's pipe into *sock* by splice(2) (see
        :mod:`plugin.splicing`). Any other stream is all yielded (formats 1 and 2 check every
        byte in Python). *progress* is told the bytes moved so far; *timeout*: seconds the
        receiver may take nothing (a socket with a timeout).

        :raises OSError: the socket broke or timed out (then the native sender is stopped).
        """
        if self._format != stream.NATIVE or self._compression is not None:
            yield from counted(self, progress)
            return
        try:
            start, check = stream.native_start(self.header)
            self._child = Streaming(self._argv, feed=False)
            with self._child:
                yield start

                def moved(total: int) -> None:
                    self.bytes = total
                    if progress is not None:
                        progress(total)
                total, frames = splicing.splice_frames(
                    self._child.proc.stdout.fileno(), sock, stream.FRAME, stream.native_data_head,
                    timeout=timeout, progress=moved)
                try:
                    self._child.finish()
                except PluginError as exc:   # it failed: the receiver is told why (the X frame)
                    sock.sendall(stream.abort_frame(str(exc)))
                    raise
                sock.sendall(stream.native_end(total, frames, check))
            self._complete = True
        finally:
            self.close()

    def close(self) -> None:
        for child in (self._packer, self._child):
            if child is not None and child.proc.poll() is None:
                child.kill()
        done, self._done = self._done, None
        if done is not None:
            done(self._complete)


def counted(chunks: Iterable[bytes], progress: Callable[[int], None] | None) -> Iterator[bytes]:
    """*chunks* as they are; *progress* (if any) is told the bytes passed on so far, before
    each chunk is."""
    sent = 0
    for chunk in chunks:
        sent += len(chunk)
        if progress is not None:
            progress(sent)
        yield chunk
