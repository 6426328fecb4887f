"""Dependencies point down: HTTP -> domain -> backends -> process/names/errors (STYLE C1)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "plugin"
DOMAIN = ("lifecycle", "trash", "volumes", "transfers", "schedules", "status", "check", "domain")
FORBIDDEN = {  # module prefix -> imports it must never make
    "plugin.backends": ("flask", "plugin.api", "plugin.app", "plugin.volumes", "plugin.cli"),
    # the domain: each module may import only those before it in DOMAIN
    **{f"plugin.{m}": ("flask", "plugin.api", "plugin.app", "plugin.cli", "btrfsutil",
                       "plugin.scheduler", "plugin.replication",
                       *(f"plugin.{later}" for later in DOMAIN[i + 1:]))
       for i, m in enumerate(DOMAIN)},
    "plugin.inflight": ("flask", "plugin.api", "plugin.volumes", "plugin.backends"),
    "plugin.snapshot_names": ("flask", "plugin.api", "plugin.volumes", "plugin.backends"),
    # ZFS: libzfs_core or the CLI is decided in zfs_commands alone
    "plugin.backends.zfs": ("plugin.process", "libzfs_core"),
    "plugin.backends.zfs_layout": ("plugin.process", "libzfs_core"),
    "plugin.backends.zfs_removal": ("plugin.process", "libzfs_core"),
    "plugin.backends.zfs_receive": ("libzfs_core",),
    # the trash's storage knows no volume, no lock and no backend: only its entries
    "plugin.trash_book": ("flask", "plugin.api", "plugin.backends", "plugin.volumes",
                          "plugin.trash", "plugin.locks"),
    # the verification record knows no backend, no lock and no check: only its results
    "plugin.verify_book": ("flask", "plugin.api", "plugin.backends", "plugin.volumes",
                           "plugin.verify", "plugin.locks"),
    # the worker's replacement knows only counts and callables: no HTTP, no storage
    "plugin.recycle": ("flask", "plugin.api", "plugin.app", "plugin.volumes", "plugin.backends",
                       "plugin.scheduler"),
    "plugin.mounts": ("flask", "plugin.api", "plugin.volumes", "plugin.backends"),
    "plugin.process": ("flask", "plugin.api", "plugin.volumes", "plugin.backends"),
    "plugin.pool": ("flask", "plugin.api", "plugin.volumes", "plugin.backends"),
    "plugin.storage": ("flask", "plugin.api", "plugin.app", "plugin.volumes", "libzfs_core",
                       "btrfsutil"),
    "plugin.api": ("btrfsutil", "plugin.backends", "plugin.process"),
    "plugin.stream": ("flask", "plugin.api", "plugin.volumes", "plugin.backends", "plugin.process"),
    "plugin.targets": ("flask", "plugin.api", "plugin.volumes", "plugin.backends", "plugin.process"),
    "plugin.retention": ("flask", "plugin.api", "plugin.volumes", "plugin.process"),
    "plugin.replication": ("flask", "plugin.api", "plugin.app", "plugin.cli", "plugin.backends"),
    "plugin.scheduler": ("flask", "plugin.api", "plugin.app", "plugin.cli", "plugin.backends"),
    "plugin.quiesce": ("flask", "plugin.api", "plugin.volumes", "plugin.backends"),
    "plugin.announce": ("flask", "plugin.api", "plugin.volumes", "plugin.backends", "plugin.app"),
    # the standby roles: common <- handoff (the role moves) <- standby (syncs, Mount)
    "plugin.standby_common": ("flask", "plugin.api", "plugin.app", "plugin.cli",
                              "plugin.handoff", "plugin.standby"),
    "plugin.handoff": ("flask", "plugin.api", "plugin.app", "plugin.cli", "plugin.standby",
                       "plugin.scheduler"),
    "plugin.standby": ("flask", "plugin.api", "plugin.app", "plugin.cli", "plugin.scheduler"),
    # monitoring: observe reads the domain (no HTTP, no storage library); metrics renders it
    # for Prometheus; freshness judges it, pure, for the CLI
    "plugin.observe": ("flask", "plugin.api", "plugin.app", "plugin.cli", "plugin.metrics",
                       "plugin.scheduler", "plugin.replication", "plugin.standby",
                       "btrfsutil", "libzfs_core", "prometheus_client"),
    "plugin.metrics": ("flask", "plugin.api", "plugin.app", "plugin.cli", "plugin.backends"),
    "plugin.freshness": ("flask", "plugin.api", "plugin.app", "plugin.backends", "plugin.volumes",
                         "plugin.observe", "plugin.metrics", "prometheus_client"),
    "plugin.cli_freshness": ("flask", "btrfsutil", "plugin.backends", "plugin.volumes",
                             "plugin.api", "plugin.observe", "plugin.metrics", "prometheus_client"),
    "plugin.cli": ("flask", "btrfsutil", "plugin.backends", "plugin.volumes", "plugin.api"),
    # below plugin.cli, which imports them
    **{f"plugin.{m}": ("flask", "btrfsutil", "plugin.backends", "plugin.volumes", "plugin.api",
                       "plugin.cli") for m in ("cli_exit", "cli_transfer")},
    "plugin.client": ("flask", "btrfsutil", "plugin.backends", "plugin.volumes", "plugin.api"),
    "plugin.cli_render": ("flask", "btrfsutil", "plugin.backends", "plugin.volumes", "plugin.api",
                          "plugin.client", "plugin.cli"),
}

# the domain never knows it is measured: it offers listeners (history.on_record), counts
# (inflight.refused) and a heartbeat (scheduler.last_pass) that plugin.metrics reads
for _name in ("history", "inflight", "scheduler", "replication", "standby", *DOMAIN):
    FORBIDDEN[f"plugin.{_name}"] = (*FORBIDDEN.get(f"plugin.{_name}", ()), "prometheus_client",
                                    "plugin.metrics", "plugin.observe")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    pkg = module_name(path).split(".")
    if path.name != "__init__.py":
        pkg = pkg[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            found |= {mod} | {f"{mod}.{a.name}" for a in node.names}
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=module_name)
def test_imports_point_down(path):
    me = module_name(path)
    for prefix, banned in FORBIDDEN.items():
        if me == prefix or me.startswith(prefix + "."):
            bad = sorted(n for n in imported(path) for b in banned if n == b or n.startswith(b + "."))
            assert not bad, f"{me} must not import {bad}"


def test_the_master_binds_without_the_heavy_imports(tmp_path: Path):
    """gunicorn's master must bind within dockerd's start window (about 10 s, then dockerd
    disables the plugin), also on a slow or emulated machine: before the bind it loads
    neither Flask, nor libzfs_core, nor the Docker SDK, nor the other backend's library."""
    probe = ("import sys, plugin.gunicorn_conf\n"
             "from plugin.config import Settings\n"
             "from plugin.storage import open_backend\n"
             "open_backend(Settings.from_env({'SNAPVOL_BACKEND': 'zfs', "
             "'SNAPVOL_ZFS_ROOT': 'tank/x'}), libzfs_core=False)\n"
             "print(' '.join(m for m in ('flask', 'werkzeug', 'libzfs_core', 'docker', 'prometheus_client', "
             "'btrfsutil', 'plugin.app', 'plugin.volumes') if m in sys.modules))\n")
    env = {**os.environ, "SNAPVOL_STATE_DIR": str(tmp_path), "SNAPVOL_BACKEND": "zfs",
           "SNAPVOL_ZFS_ROOT": "tank/x"}
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=PACKAGE.parent, env=env,
                            capture_output=True, text=True, check=True, timeout=60).stdout
    assert loaded.split() == []
