"""Build the managed plugin (the two builds the end-to-end tests install: tags 1 and 2, the
second for ``docker plugin upgrade``) and push them into a loopback registry's storage, before
any lane starts.

scripts/test runs this first, so that the OpenZFS lane (which cannot build: no base image and
no network in its VM) can run beside the host lane instead of after it; both lanes then install
the very same builds, and the host lane's ``plugin_references`` fixture takes them from the
registry instead of building again (``SNAPVOL_E2E_PUBLISHED=1``).

Usage (root, from the repository, with its venv's python):
``python -m tests.e2e.publish REGISTRY_STORAGE_DIR``
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.e2e.harness import DockerDaemon, Registry, build_plugin, mounts_under

PLUGIN_TAGS = ("1", "2")


def publish(storage: Path) -> list[str]:
    """Build and push every tag of :data:`PLUGIN_TAGS` into the registry storage *storage*
    (through a private dockerd and registry, both gone when this returns). Returns the
    references as pushed (their registry address is this run's; the storage keeps only the
    repository name and tags, so any registry serving *storage* serves them)."""
    base = Path(tempfile.mkdtemp(prefix="snapvol-publish-", dir="/tmp"))
    docker = DockerDaemon(base / "docker")
    registry = Registry(storage)
    try:
        docker.base.mkdir()
        docker.start()
        registry.start()
        references = [f"{registry.address}/snapvol:{tag}" for tag in PLUGIN_TAGS]
        for reference in references:
            build_plugin(docker, reference)
            docker("plugin", "push", reference, timeout=300)
            docker("plugin", "rm", reference)
        return references
    finally:
        registry.stop()
        docker.stop()
        for point in mounts_under(base):        # what dockerd left mounted under its roots
            subprocess.run(["umount", "-l", point], check=False, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    started = time.monotonic()
    references = publish(Path(argv[0]))
    print(f"published {', '.join(references)} in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
