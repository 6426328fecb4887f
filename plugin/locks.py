"""Per-volume locks with bounded waits, and the single-instance lock on the state directory."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import AlreadyRunning, VolumeBusy


class _Entry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


class VolumeLocks:
    """One lock per volume name, created on first use and dropped when idle.

    Waits are bounded (default 20 s) below Docker's per-call budget (30 s for a managed
    plugin enabled with the default ``--timeout``), so a caller gets a clear
    :class:`VolumeBusy` instead of a Docker-side ``context deadline exceeded``.
    """

    def __init__(self, timeout: float = 20.0) -> None:
        self._timeout = timeout
        self._guard = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    def busy(self, name: str) -> bool:
        """Whether an operation holds (or waits for) *name*'s lock right now."""
        with self._guard:
            return name in self._entries

    def idle(self) -> bool:
        """Whether no operation holds (or waits for) any lock right now."""
        with self._guard:
            return not self._entries

    @contextmanager
    def hold(self, *names: str) -> Iterator[None]:
        """Lock every name, always in sorted order, so two callers can never deadlock.

        :raises VolumeBusy: a lock was not free within the timeout.
        """
        ordered = sorted(set(names))
        with self._guard:
            entries = [self._entries.setdefault(n, _Entry()) for n in ordered]
            for entry in entries:
                entry.users += 1
        acquired: list[_Entry] = []
        try:
            for name, entry in zip(ordered, entries):
                if not entry.lock.acquire(timeout=self._timeout):
                    raise VolumeBusy(f"volume {name} is busy with another operation; retry later")
                acquired.append(entry)
            yield
        finally:
            for entry in reversed(acquired):
                entry.lock.release()
            with self._guard:
                for name, entry in zip(ordered, entries):
                    entry.users -= 1
                    if not entry.users:
                        del self._entries[name]


def single_instance(state_dir: Path, *, wait: float = 10.0, who: str = "") -> int:
    """Take the exclusive lock of *state_dir* and return its file descriptor (keep it open).

    The lock lives as long as the descriptor: a crashed process releases it at once. We wait
    up to *wait* seconds because a killed gunicorn master leaves its worker (which inherited
    the descriptor) running for a second or two before it notices and exits. *who* (e.g.
    "a host install") is written beside our pid, so that a refused instance can say what holds
    the directory (a managed plugin cannot see the host's processes).

    :raises AlreadyRunning: another live process holds the lock.
    """
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / "snapvol.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 128, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                pid, _, kind = holder.partition(" ")
                raise AlreadyRunning(
                    f"another snapvol process (pid {pid}) is using {state_dir}"
                    + (f" ({kind})" if kind else "")
                    + "; stop it first, or give this instance its own SNAPVOL_STATE_DIR") from None
            time.sleep(0.2)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {who}".strip().encode() + b"\n", 0)
    return fd
