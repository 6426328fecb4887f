"""config.json (the managed plugin's manifest) and the Dockerfile cannot drift from the code."""

from __future__ import annotations

import json
import re
from pathlib import Path

from plugin.config import Settings

REPO = Path(__file__).resolve().parents[2]
MANIFEST = json.loads((REPO / "config.json").read_text())
ENV = {e["name"]: e for e in MANIFEST["env"]}
FIXED = {"SNAPVOL_STATE_DIR", "SNAPVOL_PUBLISH_DIR", "SNAPVOL_SOCKET", "SNAPVOL_RUN_DIR",
         "SNAPVOL_DOCKER_HOST"}
# settable, with a default of the manifest's layout (the code's default is empty)
LAYOUT_DEFAULTS = {"SNAPVOL_SSH_DIR"}


def test_every_setting_is_in_the_manifest_and_nothing_else():
    variables = {spec[0] for spec in Settings.SPEC.values()}
    assert set(ENV) == variables


def test_user_settings_are_settable_with_the_code_defaults():
    defaults = {spec[0]: spec[1] for spec in Settings.SPEC.values()}
    for name, entry in ENV.items():
        if name in FIXED:
            assert "settable" not in entry, f"{name} is wired to the manifest's layout"
        else:
            assert entry.get("settable") == ["value"], name
            if name not in LAYOUT_DEFAULTS:
                assert entry["value"] == defaults[name], name


def test_fixed_settings_match_the_layout():
    assert ENV["SNAPVOL_PUBLISH_DIR"]["value"] == MANIFEST["propagatedMount"]
    assert ENV["SNAPVOL_SOCKET"]["value"] == "/run/docker/plugins/" + MANIFEST["interface"]["socket"]
    data = next(m for m in MANIFEST["mounts"] if m["name"] == "data")
    assert ENV["SNAPVOL_STATE_DIR"]["value"].startswith(data["destination"] + "/")
    assert data["settable"] == ["source"]
    docker = next(m for m in MANIFEST["mounts"] if m["name"] == "docker")
    assert ENV["SNAPVOL_DOCKER_HOST"]["value"] == f"unix://{docker['destination']}/docker.sock"
    assert docker["settable"] == ["source"]
    ssh = next(m for m in MANIFEST["mounts"] if m["name"] == "ssh")
    assert ENV["SNAPVOL_SSH_DIR"]["value"].startswith(ssh["destination"] + "/")
    assert ssh["settable"] == ["source"] and "ro" in ssh["options"]
    settings = Settings.from_env({k: e["value"] for k, e in ENV.items()})
    assert str(settings.pool_mountpoint).startswith(MANIFEST["propagatedMount"] + "/")


def test_manifest_interface_and_privileges():
    assert MANIFEST["interface"]["types"] == ["docker.volumedriver/1.0"]
    assert MANIFEST["linux"]["capabilities"] == ["CAP_SYS_ADMIN"]
    # ssh:// replication and standbys, and /metrics on the host's loopback
    assert MANIFEST["network"]["type"] == "host"


def test_dockerfile_runs_what_the_manifest_runs():
    dockerfile = (REPO / "Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1))
    assert cmd == MANIFEST["entrypoint"]
    assert f"WORKDIR {MANIFEST['workdir']}" in dockerfile
    env_line = re.search(r"^ENV (.*)$", dockerfile, re.M).group(1)
    for pair in env_line.split():
        name, value = pair.split("=", 1)
        assert ENV[name]["value"] == value


def test_the_readme_lists_every_privilege_the_manifest_asks_for():
    """README's "What the managed plugin may touch" names every mount, capability and the
    network with its reason; a privilege added to config.json without a reason fails here."""
    readme = (REPO / "README.md").read_text()
    table = readme.split("### What the managed plugin may touch", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    for mount in MANIFEST["mounts"]:
        row = next((r for r in rows if f"mount `{mount['name']}`" in r), None)
        assert row is not None, f"mount {mount['name']} is not in the README's table"
        assert f"host `{mount['source']}`" in row and mount["destination"] in row, row
        assert ("read-only" in row) == ("ro" in mount["options"]), row
        assert ("no submounts" in row) == ("rbind" not in mount["options"]), row
    for capability in MANIFEST["linux"]["capabilities"]:
        assert any(f"capability `{capability}`" in r for r in rows)
    assert any(f"network `{MANIFEST['network']['type']}`" in r for r in rows)
    assert any(f"propagated mount `{MANIFEST['propagatedMount']}`" in r for r in rows)
    assert MANIFEST["linux"]["allowAllDevices"] and any("all devices allowed" in r for r in rows)
