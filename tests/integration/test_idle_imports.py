"""What an idle plugin loads (issue 17: idle RSS of all its processes at most 60 MB): the
production app on a real Btrfs, after its start-up jobs, has not imported the Docker SDK
(13 MiB; it comes on first use by quiesce or a verification's check container)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import sys
from plugin.app import create_app
app = create_app()
# what post_worker_init's threads do first, run here in order and at once
assert not app.extensions["snapvol.announcer"].check()          # no dockerd: reported
assert not app.extensions["snapvol.domain"].verifier.recover()  # ditto, retried later
from datetime import datetime, timezone
app.extensions["snapvol.scheduler"].run_once(datetime.now(timezone.utc))
print(" ".join(m for m in ("docker", "requests", "urllib3", "paramiko", "pkg_resources")
               if m in sys.modules))
"""


def test_the_start_up_jobs_do_not_load_the_docker_sdk(btrfs_mount: Path, tmp_path: Path):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "SNAPVOL_BTRFS_ROOT": str(btrfs_mount), "SNAPVOL_STATE_DIR": str(tmp_path / "state"),
           "SNAPVOL_RUN_DIR": str(tmp_path / "run"),
           "SNAPVOL_SOCKET": str(tmp_path / "snapvoltest.sock"),
           "SNAPVOL_DOCKER_HOST": f"unix://{tmp_path}/no-dockerd.sock"}
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == []
