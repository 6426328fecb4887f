"""DockerQuiescer's hook exec against dockerd's "is paused" window (a fake API client)."""

from __future__ import annotations

import pytest

from plugin import quiesce
from plugin.quiesce import Container, DockerQuiescer

PAUSED = ('409 Client Error: Conflict ("Container 0123abcd is paused, unpause the container '
          'before exec")')


class FakeAPI:
    """exec_create refuses with *errors* (in order), then answers."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        self.tries = 0

    def exec_create(self, container_id, argv, stdout, stderr):
        self.tries += 1
        if self.errors:
            raise RuntimeError(self.errors.pop(0))
        return {"Id": "exec1"}


class FakeClient:
    def __init__(self, errors: list[str]) -> None:
        self.api = FakeAPI(errors)


APP = Container("0123abcd", "app", "running", {})


def test_a_hook_waits_out_dockerds_stale_paused_state():
    client = FakeClient([PAUSED, PAUSED, PAUSED])
    assert DockerQuiescer._exec_create(client, APP, ["true"]) == {"Id": "exec1"}
    assert client.api.tries == 4


def test_any_other_refusal_is_not_tried_again():
    client = FakeClient(["404 Client Error: no such container"])
    with pytest.raises(RuntimeError, match="no such container"):
        DockerQuiescer._exec_create(client, APP, ["true"])
    assert client.api.tries == 1


def test_a_container_that_stays_paused_is_given_up_on(monkeypatch):
    monkeypatch.setattr(quiesce, "UNPAUSE_SETTLE_SECONDS", 0.3)
    client = FakeClient([PAUSED] * 1000)
    with pytest.raises(RuntimeError, match="is paused"):
        DockerQuiescer._exec_create(client, APP, ["true"])
    assert 2 <= client.api.tries < 10
