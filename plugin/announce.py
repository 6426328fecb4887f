"""Keep this snapvol in dockerd's list of volume drivers, so that a Swarm manager schedules
tasks that use it onto this node (host installs; a managed plugin is always listed).

dockerd puts a legacy plugin (a socket in /run/docker/plugins) into the node's Swarm
description only once it has looked the driver up (what ``docker info`` shows under
Plugins.Volume), and it looks a driver up only when a request names it or lists every volume.
A dockerd that (re)started with no snapvol volume never does by itself, and every task that
needs the driver stays Pending with "missing plugin". So the plugin checks, soon after it
starts and then every :data:`INTERVAL` seconds, that dockerd's ``/info`` lists its driver, and
when it does not, lists the volumes (``GET /volumes``): dockerd scans the plugin directories
and registers the driver. The node's Swarm agent publishes its new description at its next
tick (at most 20 s later: swarmkit's ``nodeUpdatePeriod``).

The calls go through :class:`plugin.engine.EngineClient`, not the Docker SDK, which would
add 13 MiB to every idle host install for two GETs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from .engine import EngineClient

log = logging.getLogger(__name__)

INTERVAL = 10.0           # seconds between checks: one ``/info`` call each
FIRST_CHECK = 1.0         # after start: the socket answers by then, dockerd may call List


class DriverAnnouncer:
    """Checks, in a thread of its own, that dockerd at *base_url* lists volume driver
    *driver*, and makes it look the driver up when it does not."""

    def __init__(self, base_url: str, driver: str, *, interval: float = INTERVAL,
                 timeout: float = 30.0, client: Callable[[], Any] | None = None) -> None:
        self._base_url = base_url
        self._driver = driver
        self._interval = interval
        self._timeout = timeout
        self._client = client or (lambda: EngineClient(self._base_url, self._timeout))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unreachable_logged = False

    def check(self) -> bool:
        """One check: True when dockerd lists the driver (after being asked to look it up),
        False when dockerd cannot be reached or still does not list it. Never raises."""
        try:
            client = self._client()
        except Exception as exc:
            self._unreachable(exc)
            return False
        try:
            if self._driver in self._volume_drivers(client):
                self._unreachable_logged = False
                return True
            log.info("dockerd at %s does not list volume driver %s: asking it to look it up "
                     "(so that Swarm can schedule onto this node)", self._base_url, self._driver)
            client.list_volumes()
            known = self._driver in self._volume_drivers(client)
            if not known:
                log.warning("dockerd at %s still does not list volume driver %s after listing "
                            "the volumes", self._base_url, self._driver)
            return known
        except Exception as exc:
            self._unreachable(exc)
            return False
        finally:
            client.close()

    @staticmethod
    def _volume_drivers(client: Any) -> list[str]:
        return list(((client.info() or {}).get("Plugins") or {}).get("Volume") or [])

    def _unreachable(self, exc: Exception) -> None:
        # once per outage: a host without dockerd (tests, a plain CLI host) is not an error
        if not self._unreachable_logged:
            log.info("cannot check that dockerd at %s lists volume driver %s: %s",
                     self._base_url, self._driver, exc)
            self._unreachable_logged = True

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="snapvol-announce", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        wait = FIRST_CHECK
        while not self._stop.wait(wait):
            self.check()
            wait = self._interval

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
