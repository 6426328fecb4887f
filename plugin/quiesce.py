"""Consistent snapshots: pause the containers that use a volume, through the Docker Engine API.

A snapshot is crash-consistent by itself; pausing the writers (the freezer cgroup, ``docker
pause``) makes several volumes one point in time, and a container's own hooks make it
application-consistent. A container declares them with labels, run with ``docker exec``:

* ``snapvol.pre-snapshot``  before the pause (e.g. ``psql -U postgres -c CHECKPOINT``),
* ``snapvol.post-snapshot`` after the unpause.

A label is a JSON list (an argv, like Dockerfile's exec form) or a plain string split like a
shell would split words, but never given to a shell: a user who wants one writes
``["sh", "-c", "..."]`` in their own container. A failing pre-snapshot hook (non-zero exit,
timeout) cancels the snapshot; the post-snapshot hooks of the containers whose pre-snapshot
hook ran, and the unpause, always happen, also when the snapshot fails.

This talks to dockerd, so it must never run inside a request dockerd is waiting on (Create,
Mount...): dockerd may hold locks that ``pause`` needs. Only the CLI's snapshot call and the
scheduler use it.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .errors import PluginError

log = logging.getLogger(__name__)

PRE_HOOK = "snapvol.pre-snapshot"
POST_HOOK = "snapvol.post-snapshot"

#: How long a hook waits for dockerd to see a container we just unpaused as running.
UNPAUSE_SETTLE_SECONDS = 5.0


class QuiesceFailed(PluginError):
    """Docker could not be reached, a container could not be paused, or a hook failed."""

    http_status = 503


@dataclass(frozen=True)
class Container:
    id: str
    name: str
    state: str                 # running | paused | exited | created | ...
    labels: dict[str, str]


def hook_argv(label: str) -> list[str]:
    """The argv of a hook label: a JSON list of strings, or words split like a shell would.

    :raises ValueError: empty, or a JSON value that is not a list of strings.
    """
    text = label.strip()
    if text.startswith("["):
        argv = json.loads(text)
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise ValueError("a JSON hook must be a list of strings")
    else:
        argv = shlex.split(text)
    if not argv:
        raise ValueError("empty hook")
    return argv


class DockerQuiescer:
    """Finds, pauses and hooks the containers of volumes through dockerd's API (``docker`` SDK).

    :param base_url: dockerd's API, e.g. ``unix:///var/run/docker.sock``.
    :param timeout: seconds for each API call (list, pause, unpause).
    :param hook_timeout: seconds a hook may run before it counts as failed.
    """

    def __init__(self, base_url: str, *, timeout: float = 10.0, hook_timeout: float = 60.0) -> None:
        self._base_url = base_url
        self._timeout = timeout
        self._hook_timeout = hook_timeout

    def _client(self, timeout: float) -> Any:
        import docker   # imported on first use: the Docker calls never need it

        try:
            return docker.DockerClient(base_url=self._base_url, timeout=int(max(1, timeout)),
                                       version="auto")
        except docker.errors.DockerException as exc:
            raise QuiesceFailed(f"cannot reach Docker at {self._base_url}: {exc}") from None

    def containers(self, volumes: Iterable[str]) -> list[Container]:
        """Every container (running or not) that mounts one of *volumes*, sorted by name.

        :raises QuiesceFailed: Docker cannot be asked.
        """
        found: dict[str, Container] = {}
        client = self._client(self._timeout)
        try:
            for volume in volumes:
                for c in client.containers.list(all=True, filters={"volume": volume}):
                    # the filter also matches a mount *destination* equal to the name
                    if any(m.get("Type") == "volume" and m.get("Name") == volume
                           for m in c.attrs.get("Mounts") or ()):
                        found[c.id] = Container(c.id, c.name, c.status, dict(c.labels or {}))
        except Exception as exc:
            raise QuiesceFailed(f"cannot list the containers of {', '.join(volumes)} "
                                f"through Docker: {exc}") from None
        finally:
            client.close()
        return sorted(found.values(), key=lambda c: c.name)

    @contextmanager
    def quiesced(self, volumes: Iterable[str]) -> Iterator[list[Container]]:
        """Run pre-snapshot hooks, pause the running containers of *volumes*, yield them;
        afterwards unpause what we paused and run the post-snapshot hooks, whatever happened.

        Containers paused by someone else stay paused and get no hooks (exec is impossible
        in a paused container); stopped ones write nothing and are left alone.

        :raises QuiesceFailed: Docker unreachable, a pre-snapshot hook failed, or a
            container could not be paused (everything done so far is undone first).
        """
        volumes = list(volumes)
        running = [c for c in self.containers(volumes) if c.state == "running"]
        api = self._client(self._timeout)
        hooks = self._client(self._hook_timeout + 5)
        hooked: list[Container] = []
        paused: list[Container] = []
        try:
            for c in running:
                if PRE_HOOK in c.labels:
                    hooked.append(c)
                    self._run_hook(hooks, c, PRE_HOOK)
            for c in running:
                try:
                    api.api.pause(c.id)
                except Exception as exc:
                    raise QuiesceFailed(f"cannot pause container {c.name}: {exc}") from None
                paused.append(c)
                log.info("paused container %s for a snapshot of %s", c.name, ", ".join(volumes))
            yield running
        finally:
            problems = []
            for c in reversed(paused):
                try:
                    api.api.unpause(c.id)
                    log.info("unpaused container %s", c.name)
                except Exception as exc:   # keep going: the others must run again
                    log.error("cannot unpause container %s: %s", c.name, exc)
                    problems.append(f"cannot unpause container {c.name}: {exc}")
            for c in hooked:
                if POST_HOOK in c.labels:
                    try:
                        self._run_hook(hooks, c, POST_HOOK)
                    except QuiesceFailed as exc:
                        log.error("%s", exc)   # the snapshot is taken; the hook's failure is logged
            api.close()
            hooks.close()
            if problems:
                raise QuiesceFailed("; ".join(problems))

    def _run_hook(self, client: Any, container: Container, label: str) -> None:
        try:
            argv = hook_argv(container.labels[label])
        except ValueError as exc:
            raise QuiesceFailed(f"container {container.name}: label {label} is not a command "
                                f"({exc})") from None
        log.info("container %s: running %s hook %s", container.name, label, argv)
        try:
            result = self._exec_create(client, container, argv)
            output = client.api.exec_start(result["Id"])
            code = client.api.exec_inspect(result["Id"])["ExitCode"]
        except Exception as exc:
            raise QuiesceFailed(f"container {container.name}: {label} hook {argv} did not "
                                f"finish within {self._hook_timeout:g} s or could not run: {exc}") from None
        text = output.decode("utf-8", "replace").strip() if isinstance(output, bytes) else str(output)
        log.info("container %s: %s hook exited %s: %s", container.name, label, code, text[-2000:])
        if code != 0:
            raise QuiesceFailed(f"container {container.name}: {label} hook {argv} exited {code}: "
                                f"{text[-500:]}")

    @staticmethod
    def _exec_create(client: Any, container: Container, argv: list[str]) -> Any:
        """``exec_create``, tried again for a few seconds while dockerd calls the container
        paused.

        Why: dockerd can call a container paused for a moment after it answered our unpause.
        Its containerd event monitor sets ``Paused`` again when containerd's "paused" event
        is handled after the unpause, until the "resumed" event follows (daemon/monitor.go;
        the pause and unpause are then logged twice). An exec in that window is refused
        with 409 "is paused", and the post-snapshot hook of a quick snapshot was skipped.
        """
        deadline = time.monotonic() + UNPAUSE_SETTLE_SECONDS
        while True:
            try:
                return client.api.exec_create(container.id, argv, stdout=True, stderr=True)
            except Exception as exc:
                if "is paused" not in str(exc) or time.monotonic() > deadline:
                    raise
                log.info("container %s: dockerd still calls it paused; trying the hook again",
                         container.name)
                time.sleep(0.1)
