"""The Docker side of validated restores (:mod:`plugin.verify`): which container uses a
volume, and the check container itself, through dockerd's API (the ``docker`` SDK).

The check container gets only the scratch clone, as a bind mount of its path on the host (a
host install: the plugin's paths are the host's), never the volume itself; no network unless
the volume's options ask for one; the label :data:`~plugin.verify.CONTAINER_LABEL` so a
plugin killed meanwhile removes it at its next start; it is killed at its timeout and always
removed. Its command is an argv given to dockerd, never a shell string of anything a user
typed.

Like :mod:`plugin.quiesce`, this never runs inside a request dockerd is waiting on: only the
CLI's verify call and the scheduler use it.
"""

from __future__ import annotations

import logging
from typing import Any

from .errors import PluginError
from .verify import CONTAINER_LABEL, TAIL_LINES, CheckRun, Outcome, Use
from .verify_spec import LABEL

log = logging.getLogger(__name__)

#: Reserve on top of a check's timeout for dockerd's answer to the wait.
WAIT_SLACK = 30


class CheckCannotRun(PluginError):
    """Docker could not be asked, or refused to create or start the check container."""

    http_status = 502


class DockerChecks:
    """Runs check containers through dockerd at *base_url* (``unix:///var/run/docker.sock``),
    each API call bounded by *timeout* seconds (the wait for the check by its own)."""

    def __init__(self, base_url: str, *, timeout: float = 10.0) -> None:
        self._base_url = base_url
        self._timeout = timeout

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
        from docker.types import Mount
        from requests.exceptions import RequestException

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
                    mounts=[Mount(target=check.path, source=str(check.source), type="bind")],
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
                except Exception as exc:
                    log.error("verify: cannot remove the check container %s (the next start "
                              "does): %s", container.short_id, exc)
        finally:
            client.close()
            waiter.close()

    def remove_leftovers(self) -> int:
        """Remove every container with the check label (a killed plugin's)."""
        client = self._client(self._timeout)
        try:
            leftovers = client.containers.list(all=True, filters={"label": CONTAINER_LABEL})
            for c in leftovers:
                c.remove(force=True)
            return len(leftovers)
        except Exception as exc:
            raise CheckCannotRun(f"cannot remove leftover check containers: {exc}") from None
        finally:
            client.close()
