"""The ``snapvol`` command as one file that needs only ``python3``: for hosts where snapvol runs
only as the managed plugin (nothing of it is installed on the host itself).

The CLI is a client of the plugin's socket and imports only the standard library (a test runs
the bundle under ``python3 -I -S``, with no site-packages at all). The managed plugin writes
the bundle into its data directory at every start (``/var/lib/snapvol/bin/snapvol`` with the
default data mount), so a symlink to it follows plugin upgrades::

    ln -sf /var/lib/snapvol/bin/snapvol /usr/local/bin/snapvol

That also makes such a host an ssh replication target: ``ssh host snapvol receive ...`` finds
the managed plugin's socket by itself (:func:`plugin.client.find_socket`).
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
# what `import plugin.cli` loads (checked by tests/unit/test_cli_bundle.py)
MODULES = ("__init__", "cli", "cli_exit", "cli_freshness", "cli_render", "cli_transfer",
           "cli_verify", "client", "freshness", "stream", "units")
MAIN = "import sys\nfrom plugin.cli import entry_point\nsys.exit(entry_point())\n"


def bundle() -> bytes:
    """The bundle's bytes: a ``#!/usr/bin/env python3`` line, then a zip application of the
    CLI's modules (Python runs a zip with a ``__main__.py``; the line before it is ignored)."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("__main__.py", MAIN)
        for name in MODULES:
            zf.write(PACKAGE / f"{name}.py", f"plugin/{name}.py")
    return b"#!/usr/bin/env python3\n" + archive.getvalue()


def write_bundle(path: Path) -> None:
    """Write the bundle to *path* (mode 0755), replacing an older one atomically: a symlink
    to it, or a ``snapvol`` running from it, never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(bundle())
        temporary.chmod(0o755)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
