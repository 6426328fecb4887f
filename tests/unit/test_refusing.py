"""A managed plugin whose data directory another snapvol holds: every call says why."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from plugin.api.refusing import refusing_app
from plugin.errors import AlreadyRunning
from plugin.locks import single_instance
from plugin.refusal import managed_plugin_refusal


def test_the_lock_says_what_holds_it(tmp_path: Path):
    fd = single_instance(tmp_path, who="a host install")
    try:
        with pytest.raises(AlreadyRunning) as refused:
            single_instance(tmp_path, wait=0.2, who="a managed Docker plugin")
    finally:
        os.close(fd)
    assert f"(pid {os.getpid()}) is using {tmp_path} (a host install)" in str(refused.value)


@pytest.mark.parametrize("endpoint", ["/VolumeDriver.Create", "/VolumeDriver.List",
                                      "/VolumeDriver.Mount", "/Snapvol.Status", "/anything"])
def test_every_call_but_the_handshake_answers_the_reason(endpoint):
    reason = managed_plugin_refusal("another snapvol process (pid 7) is using /mnt/host/snapvol")
    client = refusing_app(reason).test_client()
    answer = client.post(endpoint, data=b'{"Name": "x"}')
    assert answer.status_code == 503 and answer.get_json() == {"Err": reason}
    assert "docker plugin set PLUGIN data.source=" in reason
    assert client.post("/Plugin.Activate").get_json() == {"Implements": ["VolumeDriver"], "Err": ""}
    assert client.post("/VolumeDriver.Capabilities").get_json()["Capabilities"] == {"Scope": "local"}
