"""Hostile input over the raw socket, against the real plugin on real Btrfs.

Every case must get a JSON ``Err`` (and an error status), no traceback, no command run, no
path outside the root, and no change to the volume list.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from plugin import names

MARKER = Path("/tmp/snapvol-hostile-marker")
HOSTILE_NAMES = [
    "../x", "../../etc", "a/b", "/abs", ".", "..", ".hidden", "-rf", "x;touch " + str(MARKER),
    "$(touch " + str(MARKER) + ")", "`touch " + str(MARKER) + "`", "a\0b", "x" * 10240, "", " ",
    "a b", "a\nb", "é", "x|y", "x&y", "*", "~root", "%2e%2e", 5, 1.5, True, [], {}, ["v"],
]
VOLUME_ENDPOINTS = ["Create", "Remove", "Mount", "Unmount", "Path", "Get"]

CASES: list[tuple[str, str, bytes]] = []
for endpoint in VOLUME_ENDPOINTS:
    for name in HOSTILE_NAMES:
        CASES.append((f"{endpoint}-name-{name!r:.30}", f"/VolumeDriver.{endpoint}",
                      json.dumps({"Name": name, "ID": "a" * 64}).encode()))
BODIES = {
    "not-json": b"{not json",
    "truncated": b'{"Name": "v1", "Opts": {',
    "array": b"[1, 2, 3]",
    "string": b'"v1"',
    "number": b"42",
    "null": b"null",
    "empty-object": b"{}",
    "name-null": b'{"Name": null}',
    "huge": b'{"Name": "' + b"x" * (2 << 20) + b'"}',
    "binary": bytes(range(256)),
    "deep-nesting": b"[" * 100000 + b"]" * 100000,
    "bad-utf8": b'{"Name": "\xff\xfe"}',
}
for label, body in BODIES.items():
    for endpoint in ("Create", "Mount", "Get"):
        CASES.append((f"{endpoint}-body-{label}", f"/VolumeDriver.{endpoint}", body))
OPTIONS = {
    "unknown": {"bogus": "1"},
    "shell-in-option": {"$(touch /tmp/snapvol-hostile-marker)": "1"},
    "size-zero": {"size": "0"},
    "size-negative": {"size": "-5G"},
    "size-text": {"size": "$(reboot)"},
    "size-huge-number": {"size": "9" * 400},
    "uid-negative": {"uid": "-1"},
    "uid-too-big": {"uid": "99999999999"},
    "gid-text": {"gid": "root"},
    "mode-not-octal": {"mode": "999"},
    "mode-too-big": {"mode": "77777"},
    "compression-unknown": {"compression": "lz4"},
    "compression-injection": {"compression": "zstd; touch /tmp/snapvol-hostile-marker"},
    "nocow-bad": {"nocow": "maybe"},
    "other-backend-only": {"nocow": "true", "recordsize": "128K"},   # one is foreign to each
    "replicate-option-injection": {"schedule": "1h", "replicate": "ssh://-oProxyCommand=touch /tmp/snapvol-hostile-marker"},
    "replicate-shell-user": {"schedule": "1h", "replicate": "ssh://$(reboot)@host"},
    "schedule-zero": {"schedule": "0s"},
    "schedule-shell": {"schedule": "$(touch /tmp/snapvol-hostile-marker)"},
    "schedule-huge-number": {"schedule": "9" * 400 + "s"},
    "keep-shell": {"schedule": "1h", "keep": "7d;touch /tmp/snapvol-hostile-marker"},
    "keep-10k": {"schedule": "1h", "keep": "1d," * 3000},
    "keep-without-schedule": {"keep": "7d"},
    "quiesce-unknown": {"schedule": "1h", "quiesce": "freeze"},
    "value-number": {"size": 5},
    "value-null": {"size": None},
    "opts-list": ["size=1G"],
    "opts-string": "size=1G",
    "option-name-10k": {"x" * 10240: "1"},
    "from-traversal": {"from": "../../etc"},
    "from-shell": {"from": "$(touch /tmp/snapvol-hostile-marker)"},
    "from-missing-snapshot": {"from": "hostile-mounted@nope"},
    "from-snapshot-traversal": {"from": "hostile-mounted@../../x"},
    "from-with-mode": {"from": "hostile-mounted", "mode": "777"},
}
for label, opts in OPTIONS.items():
    CASES.append((f"Create-opts-{label}", "/VolumeDriver.Create",
                  json.dumps({"Name": "hostile-ok-name", "Opts": opts}).encode()))
for endpoint in ("Remove", "Mount", "Path", "Get"):
    CASES.append((f"{endpoint}-missing-volume", f"/VolumeDriver.{endpoint}",
                  json.dumps({"Name": "no-such-volume", "ID": "b" * 64}).encode()))
for label, body in {"id-missing": {"Name": "hostile-mounted"},
                    "id-traversal": {"Name": "hostile-mounted", "ID": "../../x"},
                    "id-10k": {"Name": "hostile-mounted", "ID": "f" * 10240},
                    "id-number": {"Name": "hostile-mounted", "ID": 7}}.items():
    for endpoint in ("Mount", "Unmount"):
        CASES.append((f"{endpoint}-{label}", f"/VolumeDriver.{endpoint}", json.dumps(body).encode()))
ADMIN = {
    "snapshot-create-traversal": ("/Snapvol.SnapshotCreate", {"Volumes": ["../x"], "Name": "s"}),
    "snapshot-create-shell-name": ("/Snapvol.SnapshotCreate",
                                   {"Volumes": ["hostile-mounted"], "Name": "$(touch /tmp/snapvol-hostile-marker)"}),
    "snapshot-create-reserved": ("/Snapvol.SnapshotCreate", {"Volumes": ["hostile-mounted"], "Name": "auto-x"}),
    "snapshot-create-not-a-list": ("/Snapvol.SnapshotCreate", {"Volumes": "hostile-mounted", "Name": "s"}),
    "snapshot-create-missing-volume": ("/Snapvol.SnapshotCreate", {"Volumes": ["hostile-mounted", "ghost"], "Name": "s"}),
    "snapshot-list-traversal": ("/Snapvol.SnapshotList", {"Volume": "../.."}),
    "snapshot-rm-traversal": ("/Snapvol.SnapshotRemove", {"Volume": "hostile-mounted", "Snapshot": "../../volumes/x"}),
    "snapshot-rm-missing": ("/Snapvol.SnapshotRemove", {"Volume": "hostile-mounted", "Snapshot": "nope"}),
    "rollback-in-use": ("/Snapvol.Rollback", {"Volume": "hostile-mounted", "Snapshot": "nope"}),
    "rollback-bad-flag": ("/Snapvol.Rollback", {"Volume": "hostile-mounted", "Snapshot": "s", "DestroyNewer": "yes"}),
    "snapshot-create-bad-quiesce": ("/Snapvol.SnapshotCreate",
                                    {"Volumes": ["hostile-mounted"], "Name": "s", "Quiesce": "$(reboot)"}),
    "prune-traversal": ("/Snapvol.Prune", {"Volume": "../x"}),
    "prune-missing": ("/Snapvol.Prune", {"Volume": "ghost"}),
    "prune-bad-flag": ("/Snapvol.Prune", {"Volume": "hostile-mounted", "DryRun": "yes"}),
    "send-traversal": ("/Snapvol.Send", {"Volume": "../x"}),
    "send-missing-snapshot": ("/Snapvol.Send", {"Volume": "hostile-mounted", "Snapshot": "nope"}),
    "send-missing-base": ("/Snapvol.Send", {"Volume": "hostile-mounted", "Snapshot": "nope", "Since": "../x"}),
    "send-missing-volume": ("/Snapvol.Send", {"Volume": "ghost"}),
    "replicate-shell-target": ("/Snapvol.Replicate",
                               {"Volume": "hostile-mounted", "Target": "ssh://$(touch /tmp/snapvol-hostile-marker)"}),
    "replicate-option-target": ("/Snapvol.Replicate", {"Volume": "hostile-mounted", "Target": "ssh://-oProxyCommand=x"}),
    "replicate-missing-volume": ("/Snapvol.Replicate", {"Volume": "ghost", "Target": "ssh://standby"}),
    "replicate-bad-remote-name": ("/Snapvol.Replicate",
                                  {"Volume": "hostile-mounted", "Target": "ssh://standby", "As": "../x"}),
}
for label, (path, body) in ADMIN.items():
    CASES.append((label, path, json.dumps(body).encode()))
for label, (query, body) in {
        "receive-no-volume": ("", b"SNAPVOL-STREAM\n"),
        "receive-traversal": ("?Volume=..%2F..%2Fetc", b"SNAPVOL-STREAM\n"),
        "receive-garbage": ("?Volume=hostile-new", b"\x00" * 10000),
        "receive-empty": ("?Volume=hostile-new", b""),
        "receive-json": ("?Volume=hostile-new", b'{"Name": "x"}'),
        "receive-into-mounted": ("?Volume=hostile-mounted", b"SNAPVOL-STREAM\n"),
}.items():
    CASES.append((label, "/Snapvol.Receive" + query, body))
CASES.append(("unknown-endpoint", "/VolumeDriver.Explode", b"{}"))
CASES.append(("unknown-subsystem", "/NetworkDriver.CreateNetwork", b"{}"))
CASES.append(("path-traversal-url", "/../../etc/passwd", b"{}"))


# a line of `zfs list` / `btrfs subvolume list` that names one of snapvol's own volumes
INTERNAL = re.compile(r"(^|[/ ])" + re.escape(names.INTERNAL_PREFIX))


def snapshot_of_world(plugin) -> dict[str, object]:
    if plugin.backend == "zfs":
        root = plugin.state_dir / "zfs"
        storage = subprocess.run(["zfs", "list", "-H", "-r", "-o", "name", plugin.env["SNAPVOL_ZFS_ROOT"]],
                                 capture_output=True, text=True, check=True).stdout
    else:
        root = plugin.state_dir / "pool"
        storage = subprocess.run(["btrfs", "subvolume", "list", str(root)], capture_output=True,
                                 text=True, check=True).stdout
    # snapvol's own volumes (the trash) come and go by themselves: the session's plugin
    # purges what other tests removed 5 minutes after (SESSION_TRASH). Compared apart.
    lines = storage.splitlines()
    internal = [line for line in lines if INTERNAL.search(line)]
    return {"volumes": sorted(v["Name"] for v in plugin.call("VolumeDriver.List")[1]["Volumes"]),
            "storage": [line for line in lines if line not in internal],
            "internal": set(internal),
            "root_entries": sorted(os.listdir(root)),
            "outside": sorted(p.name for p in Path("/").iterdir()),
            "tmp": sorted(p.name for p in Path("/tmp").iterdir() if "hostile" in p.name)}


@pytest.fixture(scope="module")
def world(host_plugin):
    plugin = host_plugin
    plugin.call("VolumeDriver.Create", {"Name": "hostile-mounted"})
    plugin.call("VolumeDriver.Mount", {"Name": "hostile-mounted", "ID": "c" * 64})
    MARKER.unlink(missing_ok=True)
    before = snapshot_of_world(plugin)
    yield before
    plugin.call("VolumeDriver.Unmount", {"Name": "hostile-mounted", "ID": "c" * 64})
    plugin.call("VolumeDriver.Remove", {"Name": "hostile-mounted"})


def test_there_are_enough_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("label, path, body", CASES, ids=[c[0] for c in CASES])
def test_hostile_request(host_plugin, world, label, path, body):
    plugin = host_plugin
    status, raw = plugin.raw(path, body)
    reply = json.loads(raw)
    assert status >= 400, reply
    assert isinstance(reply.get("Err"), str) and reply["Err"], reply
    assert "Traceback" not in reply["Err"] and "File \"" not in reply["Err"]
    assert len(reply["Err"]) < 400
    assert not MARKER.exists(), "a command ran"
    now = snapshot_of_world(plugin)
    assert now["internal"] <= world["internal"], "a hostile request made one of snapvol's own"
    assert {**now, "internal": None} == {**world, "internal": None}


def test_hostile_run_left_no_internal_error_in_the_log(host_plugin, world):
    plugin = host_plugin
    assert "Traceback" not in plugin.log_tail(10**7)
    assert "internal error" not in plugin.log_tail(10**7)
