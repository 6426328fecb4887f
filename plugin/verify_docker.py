"""The Docker side of validated restores (:mod:`plugin.verify`): which container uses a
volume, and the check container itself, through dockerd's API (the ``docker`` SDK).

The check container gets only the scratch clone, never the volume itself: on a host install
as a bind mount of its path (the plugin's paths are the host's); from the managed plugin,
whose paths are not the host's, as a volume of the plugin's own driver (Docker asks the
plugin for its path, and maps it to the propagated mount as for any of its volumes; see
``api/volume_driver``, and :func:`managed_driver` for the driver's name); no network unless
the volume's options ask for one; the label :data:`~plugin.verify.CONTAINER_LABEL` so a
plugin killed meanwhile removes it at its next start; it is killed at its timeout and always
removed. Its command is an argv given to dockerd, never a shell string of anything a user
typed.

Like :mod:`plugin.quiesce`, this never runs inside a request dockerd is waiting on: only the
CLI's verify call and the scheduler use it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .engine import EngineClient
from .errors import PluginError
from .verify import CONTAINER_LABEL, SCRATCH_PREFIX, TAIL_LINES, CheckRun, Outcome, Use
from .verify_spec import LABEL

log = logging.getLogger(__name__)

#: Reserve on top of a check's timeout for dockerd's answer to the wait.
WAIT_SLACK = 30


class CheckCannotRun(PluginError):
    """Docker could not be asked, or refused to create or start the check container."""

    http_status = 502


class DockerChecks:
    """Runs check containers through dockerd at *base_url* (``unix:///var/run/docker.sock``),
    each API call bounded by *timeout* seconds (the wait for the check by its own). With
    *driver* (the managed plugin), the clone is mounted as a volume of the driver it names."""

    def __init__(self, base_url: str, *, timeout: float = 10.0,
                 driver: Callable[[], str] | None = None) -> None:
        self._base_url = base_url
        self._timeout = timeout
        self._driver = driver
        self._driver_name: str | None = None

    def _mount(self, check: CheckRun) -> Any:
        from docker.types import DriverConfig, Mount

        if self._driver is None:
            return Mount(target=check.path, source=str(check.source), type="bind")
        if self._driver_name is None:
            self._driver_name = self._driver()
        return Mount(target=check.path, source=check.clone, type="volume",
                     driver_config=DriverConfig(self._driver_name), no_copy=True)

    def _client(self, timeout: float) -> Any:
        import docker   # on first use: Docker's calls to the plugin never need it

        try:
            return docker.DockerClient(base_url=self._base_url, timeout=int(max(1, timeout)),
                                       version="auto")
        except docker.errors.DockerException as exc:
            raise CheckCannotRun(f"cannot reach Docker at {self._base_url}: {exc}") from None

    def usage(self, volume: str) -> Use | None:
        """The container that mounts *volume* (a running one first, then by name)."""
        client = self._client(self._timeout)
        found = []
        try:
            for c in client.containers.list(all=True, filters={"volume": volume}):
                for m in c.attrs.get("Mounts") or ():
                    # the filter also matches a mount destination equal to the name
                    if m.get("Type") == "volume" and m.get("Name") == volume:
                        config = c.attrs.get("Config") or {}
                        found.append((c.status != "running", c.name,
                                      Use(c.name, str(config.get("Image") or c.image.id),
                                          str(m.get("Destination")),
                                          (config.get("Labels") or {}).get(LABEL))))
        except Exception as exc:
            raise CheckCannotRun(f"cannot ask Docker which container uses {volume}: {exc}") from None
        finally:
            client.close()
        return min(found, key=lambda f: (f[0], f[1]))[2] if found else None

    def run(self, check: CheckRun) -> Outcome:
        """Create, start and wait for the check container; kill it at its timeout; return
        its exit code and last lines; remove it, whatever happened.

        :raises CheckCannotRun: the image is missing, or dockerd refused the container.
        """
        import docker
        from requests.exceptions import RequestException

        mount = self._mount(check)
        client = self._client(self._timeout)
        waiter = self._client(check.timeout + WAIT_SLACK)
        try:
            try:
                container = client.containers.create(
                    check.image, command=check.command, entrypoint=check.entrypoint,
                    working_dir=check.workdir, user=check.user or "",
                    environment=check.env or None, network_mode=check.network,
                    labels={CONTAINER_LABEL: check.clone},
                    name=f"snapvol-verify-{check.clone.rsplit('.', 1)[-1]}",
                    mounts=[mount],
                    detach=True)
            except docker.errors.ImageNotFound:
                raise CheckCannotRun(f"image {check.image} is not on this host; pull or "
                                     "build it first (snapvol never pulls)") from None
            except Exception as exc:
                raise CheckCannotRun(f"Docker refused the check container: {exc}") from None
            try:
                log.info("verify: check container %s on %s: %s %s", container.short_id,
                         check.clone, check.image, check.entrypoint or check.command or "")
                try:
                    container.start()
                except Exception as exc:
                    raise CheckCannotRun(f"the check container did not start: {exc}") from None
                try:
                    code: int | None = int(waiter.containers.get(container.id)
                                           .wait(timeout=check.timeout)["StatusCode"])
                except RequestException:
                    log.warning("verify: the check of %s timed out after %d s; killing it",
                                check.clone, check.timeout)
                    code = None
                    try:
                        container.kill()
                    except Exception as exc:          # removed below with force anyway
                        log.warning("verify: cannot kill %s: %s", container.short_id, exc)
                output = container.logs(stdout=True, stderr=True, tail=TAIL_LINES)
                text = output.decode("utf-8", "replace") if isinstance(output, bytes) else str(output)
                return Outcome(code, text.rstrip())
            finally:
                try:
                    container.remove(force=True)
                    if self._driver is not None:     # Docker's record of the clone's volume
                        client.volumes.get(check.clone).remove(force=True)
                except Exception as exc:
                    log.error("verify: cannot remove the check container %s (the next start "
                              "does): %s", container.short_id, exc)
        finally:
            client.close()
            waiter.close()

    def remove_leftovers(self) -> int:
        """Remove every container with the check label (a killed plugin's).

        Through :class:`plugin.engine.EngineClient`: this runs at every start, and with the
        SDK it would load ``docker`` into every idle plugin (13 MiB) to find nothing."""
        client = EngineClient(self._base_url, self._timeout)
        try:
            leftovers = client.list_containers(label=[CONTAINER_LABEL])
            for c in leftovers:
                client.remove_container(c["Id"])
            if self._driver is not None:             # Docker's records of the clones' volumes
                for volume in client.list_volumes(name=[SCRATCH_PREFIX]):
                    if volume["Name"].startswith(SCRATCH_PREFIX):
                        client.remove_volume(volume["Name"])
            return len(leftovers)
        except Exception as exc:
            raise CheckCannotRun(f"cannot ask Docker at {self._base_url}: {exc}") from None
        finally:
            client.close()


_PROPAGATED = re.compile(r"/plugins/([0-9a-f]{64})/propagated-mount")


def plugin_id(publish_dir: Path, mountinfo: str = "/proc/self/mountinfo") -> str:
    """The managed plugin's own ID: dockerd mounts ``<data-root>/plugins/<ID>/propagated-mount``
    at its propagatedMount (*publish_dir*), and mountinfo's root field names it.

    :raises CheckCannotRun: no such mount line.
    """
    with open(mountinfo, encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            match = _PROPAGATED.search(fields[3]) if len(fields) > 4 else None
            if match and fields[4] == str(publish_dir):
                return match.group(1)
    raise CheckCannotRun(f"cannot find this plugin's ID: no propagated mount at {publish_dir} "
                         "in /proc/self/mountinfo")


def managed_driver(base_url: str, publish_dir: Path) -> Callable[[], str]:
    """A function returning the managed plugin's driver name (``NAME:TAG`` as installed), asked
    from dockerd by the plugin's ID on first use (never while dockerd waits on the plugin)."""
    def name() -> str:
        ident = plugin_id(publish_dir)
        client = DockerChecks(base_url)._client(10.0)
        try:
            return str(client.plugins.get(ident).name)
        except Exception as exc:
            raise CheckCannotRun(f"cannot ask Docker for this plugin's name ({ident[:12]}): "
                                 f"{exc}") from None
        finally:
            client.close()
    return name
