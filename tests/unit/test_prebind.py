"""plugin.prebind: the managed plugin's socket listens before gunicorn starts, and gunicorn
serves it; a managed plugin that cannot start answers why instead of exiting."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

from plugin import prebind
from plugin.client import PluginClient
from plugin.config import Settings

REPO = Path(__file__).resolve().parents[2]

# Run by prebind's exec: what gunicorn's systemd.listen_fds() relies on.
CHECK_INHERITED = """
import os, socket, sys
assert os.environ["LISTEN_PID"] == str(os.getpid()), "exec must keep the pid"
assert os.environ["LISTEN_FDS"] == "1"
s = socket.socket(fileno=3)
assert s.getsockname() == sys.argv[1], s.getsockname()
assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1, "not listening"
print("inherited")
"""


def test_the_socket_listens_before_exec_and_is_fd_3_of_the_new_program(tmp_path: Path):
    path = tmp_path / "run" / "snapvol.sock"
    path.parent.mkdir()
    path.write_text("stale")                       # replaced, as gunicorn would
    result = subprocess.run(
        [sys.executable, "-m", "plugin.prebind", sys.executable, "-c", CHECK_INHERITED, str(path)],
        cwd=REPO, env={**os.environ, "SNAPVOL_SOCKET": str(path)}, capture_output=True,
        text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "inherited"
    assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_relative_socket_is_left_to_the_configuration_to_refuse(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "plugin.prebind", sys.executable, "-c",
         "import os; print(os.environ.get('LISTEN_FDS'))"],
        cwd=REPO, env={**os.environ, "SNAPVOL_SOCKET": "relative.sock"}, capture_output=True,
        text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "None", result.stderr
    assert not (REPO / "relative.sock").exists()


def test_the_default_socket_is_the_settings_default():
    assert str(Settings.from_env({}).socket) == prebind.DEFAULT_SOCKET


def test_a_managed_plugin_with_a_bad_setting_serves_the_reason_and_keeps_running(tmp_path: Path):
    """Through prebind and a real gunicorn: the socket is there at once, and every call but
    the handshake answers which setting is wrong and how to fix it."""
    sock = tmp_path / "run" / "snapvol.sock"
    env = {**os.environ, "SNAPVOL_SOCKET": str(sock), "SNAPVOL_THREADS": "many",
           "SNAPVOL_PUBLISH_DIR": str(tmp_path / "pub"), "SNAPVOL_STATE_DIR": str(tmp_path / "st")}
    server = subprocess.Popen(
        [sys.executable, "-m", "plugin.prebind", sys.executable, "-m", "gunicorn", "-c",
         "python:plugin.gunicorn_conf"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, answer = PluginClient(str(sock), timeout=10).call("VolumeDriver.List")
                break
            except OSError:
                assert server.poll() is None, server.communicate()[1]
                assert time.monotonic() < deadline, "no answer within 60 s"
                time.sleep(0.1)
        assert status == 503
        assert answer["Err"].startswith("snapvol cannot start: SNAPVOL_THREADS='many'")
        assert "docker plugin set PLUGIN NAME=VALUE" in answer["Err"]
        assert PluginClient(str(sock)).call("Plugin.Activate")[1]["Implements"] == ["VolumeDriver"]
        assert server.poll() is None
        assert not (tmp_path / "st").exists()          # it touched nothing
    finally:
        server.terminate()
        server.communicate(timeout=30)
