"""A plugin process refuses to start beside another one (same state, or same socket), or on
storage it cannot use, and never binds its socket then."""

from __future__ import annotations

import subprocess
import sys

from tests.e2e.harness import REPO, PluginProcess


def start_second(plugin: PluginProcess, **overrides: str) -> subprocess.CompletedProcess[str]:
    env = {**plugin.env, "SNAPVOL_PIDFILE": str(plugin.state_dir.parent / "second.pid"), **overrides}
    return subprocess.run([sys.executable, "-m", "gunicorn", "-c", "python:plugin.gunicorn_conf"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_second_process_on_the_same_state_refuses(plugin, tmp_path):
    result = start_second(plugin, SNAPVOL_SOCKET=str(tmp_path / "other.sock"))
    assert result.returncode != 0
    assert f"snapvol: another snapvol process (pid {plugin.pid}) is using {plugin.state_dir}" \
        in result.stderr
    assert not (tmp_path / "other.sock").exists()
    assert plugin.call("Snapvol.Status")[0] == 200          # the first one is untouched


def test_second_process_on_the_same_socket_refuses(plugin, tmp_path):
    result = start_second(plugin, SNAPVOL_STATE_DIR=str(tmp_path / "state"))
    assert result.returncode != 0
    assert f"snapvol: another process already serves {plugin.socket}" in result.stderr
    assert plugin.call("Snapvol.Status")[0] == 200


def test_unusable_storage_refuses_before_the_socket_exists(plugin, tmp_path):
    """dockerd counts a managed plugin as started once its socket accepts a connection: a
    plugin that cannot work must exit before binding it (gunicorn binds before the worker)."""
    socket = tmp_path / "unusable.sock"
    result = start_second(plugin, SNAPVOL_SOCKET=str(socket), SNAPVOL_STATE_DIR=str(tmp_path / "s"),
                          SNAPVOL_BACKEND="zfs", SNAPVOL_ZFS_ROOT="nosuchpool0/x")
    assert result.returncode != 0
    assert "snapvol cannot start: " in result.stderr, result.stderr[-2000:]
    assert "Listening at" not in result.stderr and not socket.exists()
