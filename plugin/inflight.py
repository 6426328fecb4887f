"""What is in flight right now: transfer slots, snapshots being sent, volumes being received.

Shared by the domain modules that must respect a running transfer: Docker's lifecycle calls
(no Mount of a volume being received, no Remove or rollback of one being sent), retention
(a snapshot being sent is never pruned) and ``snapvol check`` (a transfer's temporaries are
not leftovers). In memory only: a restart ends every transfer, and start-up removes what they
left (``Backend.finish_interrupted``).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import VolumeBusy
from .locks import VolumeLocks

Pin = tuple[str, str]          # (volume, snapshot)


class InFlight:
    """At most *slots* transfers at once (so threads are always left for Docker's calls),
    the snapshots they pin, and the volumes they are receiving into."""

    def __init__(self, locks: VolumeLocks, slots: int = 4) -> None:
        self._locks = locks
        self._slots = threading.BoundedSemaphore(slots)
        self._limit = slots
        self._guard = threading.Lock()
        self._pins: Counter[Pin] = Counter()
        self._receiving: set[str] = set()
        self._taken = 0
        self.refused = 0        # transfers refused for want of a slot since the start

    @property
    def limit(self) -> int:
        """How many transfers may run at once."""
        return self._limit

    @property
    def running(self) -> int:
        """Transfer slots held now (sends, receives, replications)."""
        with self._guard:
            return self._taken

    # ------------------------------------------------------------------ slots and pins

    def acquire_slot(self) -> None:
        """:raises VolumeBusy: all slots stayed taken for a second."""
        if not self._slots.acquire(timeout=1.0):
            with self._guard:
                self.refused += 1
            raise VolumeBusy(f"{self._limit} transfers are running already; try again when "
                             "one has finished")
        with self._guard:
            self._taken += 1

    def release_slot(self) -> None:
        with self._guard:
            self._taken -= 1
        self._slots.release()

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one slot for the block (a replication holds one for its whole run: its
        target may hang before any byte is sent, and that must count against the bound).

        :raises VolumeBusy: all slots are taken.
        """
        self.acquire_slot()
        try:
            yield
        finally:
            self.release_slot()

    def pin(self, pins: list[Pin]) -> None:
        """Mark snapshots as being sent or verified (counted: two sends may share one)."""
        with self._guard:
            self._pins.update(pins)

    def unpin(self, pins: list[Pin]) -> None:
        with self._guard:
            self._pins.subtract(pins)
            self._pins += Counter()          # drop zero counts

    def sending(self, volume: str) -> set[str]:
        """The snapshots of *volume* being sent now."""
        with self._guard:
            return {snap for (vol, snap), count in self._pins.items() if vol == volume and count}

    # ------------------------------------------------------------------ receiving

    @contextmanager
    def receiving_into(self, volume: str) -> Iterator[None]:
        """Hold a slot and mark *volume* as being received, both undone on exit (so a
        refused or failed receive leaves no trace).

        The mark is set under the volume's lock, which Mount holds while it checks the mark:
        a Mount either finished before (and the receiver's check of the volume's users sees
        it) or is refused after, so a replica in use is never replaced under a container.

        :raises VolumeBusy: no slot is free, or the volume is being received already.
        """
        self.acquire_slot()
        try:
            with self._locks.hold(volume), self._guard:
                if volume in self._receiving:
                    raise VolumeBusy(f"volume {volume} is being received already")
                self._receiving.add(volume)
            try:
                yield
            finally:
                with self._guard:
                    self._receiving.discard(volume)
        finally:
            self.release_slot()

    def is_receiving(self, volume: str) -> bool:
        with self._guard:
            return volume in self._receiving

    # ------------------------------------------------------------------ guards for callers

    def refuse_if_receiving(self, volume: str) -> None:
        """:raises VolumeBusy: *volume* is being received (caller holds its lock)."""
        if self.is_receiving(volume):
            raise VolumeBusy(f"volume {volume} is being received; try again when it is done")

    def refuse_if_sending(self, volume: str) -> None:
        """:raises VolumeBusy: a snapshot of *volume* is being sent."""
        sending = sorted(self.sending(volume))
        if sending:
            raise VolumeBusy(f"volume {volume} is being sent or verified ({', '.join(sending)}); "
                             "try again when that is done")
