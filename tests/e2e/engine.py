"""Which Docker Engine a test's daemons run: the host's (bookworm's docker.io 20.10), or the
newer one ``scripts/newer-engine`` unpacks beside it (trixie's docker.io 26.1, never installed
over the host's).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.harness import REPO

NEWER_ENGINE_SCRIPT = REPO / "scripts" / "newer-engine"


@dataclass(frozen=True)
class Engine:
    """A dockerd with the docker CLI (and Compose) of the same release.

    *root* is a tree laid out like ``/`` (``usr/sbin/dockerd``, ``usr/bin/docker``...); None
    is the host's engine, found on ``PATH``. containerd and runc always come from ``PATH``
    (see scripts/newer-engine for why the newer engine runs with bookworm's).
    """

    root: Path | None = None

    @property
    def dockerd(self) -> str:
        return str(self.root / "usr" / "sbin" / "dockerd") if self.root else "dockerd"

    @property
    def cli(self) -> str:
        return str(self.root / "usr" / "bin" / "docker") if self.root else "docker"

    @property
    def compose(self) -> list[str] | None:
        """The argv of the engine's own Compose (v2, run standalone), or None (the host's
        Compose is test_compose.py's business)."""
        if self.root is None:
            return None
        return [str(self.root / "usr" / "libexec" / "docker" / "cli-plugins" / "docker-compose")]

    def path(self) -> str:
        """``PATH`` for its dockerd: the engine's own helpers (docker-init, docker-proxy)
        before the host's, whose containerd and runc it runs with."""
        host = os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        if self.root is None:
            return host
        return os.pathsep.join([str(self.root / "usr" / "sbin"), str(self.root / "usr" / "bin"),
                                host])

    def version(self) -> str:
        """``dockerd --version``'s version (e.g. ``26.1.5+dfsg1``).

        :raises subprocess.CalledProcessError: the binary does not run.
        """
        out = subprocess.run([self.dockerd, "--version"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
        return out.split()[2].rstrip(",")


def newer_engine() -> Engine:
    """The newer engine: ``$SNAPVOL_NEWER_ENGINE`` when set (a directory scripts/newer-engine
    made), else what scripts/newer-engine makes or finds in its cache (a download of about
    45 MB the first time).

    :raises RuntimeError: it cannot be had (with the script's stderr), or the directory
        lacks dockerd.
    """
    given = os.environ.get("SNAPVOL_NEWER_ENGINE")
    if given:
        root = Path(given)
    else:
        proc = subprocess.run([str(NEWER_ENGINE_SCRIPT)], capture_output=True, text=True,
                              timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"scripts/newer-engine failed ({proc.returncode}): "
                               f"{proc.stderr.strip()[-2000:]}")
        root = Path(proc.stdout.strip().splitlines()[-1])
    engine = Engine(root)
    if not (Path(engine.dockerd).is_file() and Path(engine.cli).is_file()):
        raise RuntimeError(f"{root} has no usr/sbin/dockerd and usr/bin/docker "
                           "(made by scripts/newer-engine?)")
    return engine

