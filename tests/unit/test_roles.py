"""plugin.roles: roles.json survives a restart entry for entry, and a damaged or foreign entry
makes that volume an ordinary one instead of stopping the plugin."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from plugin.roles import PRIMARY, STANDBY, Role, RoleBook
from plugin.standby_common import same_host


def test_every_field_survives_a_restart(tmp_path: Path):
    path = tmp_path / "roles.json"
    synced_at = datetime(2026, 12, 3, 5, 51, 48, tzinfo=timezone.utc)
    book = RoleBook(path)
    book.set("pg", Role(STANDBY, 3, primary="ssh://root@10.0.0.1", sync="2s",
                        synced="repl-1", synced_at=synced_at))
    book.set("web", Role(PRIMARY, 2, standbys=("ssh://b", "ssh://c"), fenced="being handed off",
                         handoff="ssh://b"))
    again = RoleBook(path)
    assert again.all() == book.all()
    assert again.get("pg").synced_at == synced_at and again.get("pg").synced == "repl-1"
    assert again.get("web").standbys == ("ssh://b", "ssh://c")


def test_an_entry_written_before_synced_existed_still_reads(tmp_path: Path):
    path = tmp_path / "roles.json"
    path.write_text(json.dumps({"pg": {"role": "standby", "epoch": 1, "primary": "ssh://a",
                                       "since": "2026-12-02T00:00:00+00:00"}}))
    role = RoleBook(path).get("pg")
    assert role is not None and role.epoch == 1 and role.synced is None and role.synced_at is None


def test_foreign_and_damaged_entries_are_ordinary_volumes(tmp_path: Path):
    path = tmp_path / "roles.json"
    path.write_text(json.dumps({"a": {"role": "king", "epoch": 1, "since": "2026-12-02T00:00:00"},
                                "b": {"role": "primary"}, "c": "x",
                                "d": {"role": "primary", "epoch": 4,
                                      "since": "2026-12-02T00:00:00+00:00"}}))
    book = RoleBook(path)
    assert book.volumes() == {"d"}
    path.write_text("{not json")
    assert RoleBook(path).all() == {}


def test_but_moves_since_only_when_the_role_or_epoch_changes():
    old = datetime(2020, 1, 1, tzinfo=timezone.utc)
    role = Role(PRIMARY, 1, since=old)
    assert role.but(fenced="x").since == old
    assert role.but(epoch=2).since > old and role.but(epoch=2).epoch == 2
    assert role.but(role=STANDBY).since > old


@pytest.mark.parametrize("a, b, same", [
    ("ssh://root@h:22/run/x.sock", "ssh://root@h/run/x.sock", True),
    ("ssh://h/run/docker/plugins/1/snapvol.sock", "ssh://h/run/docker/plugins/2/snapvol.sock", False),
    ("ssh://h/run/docker/plugins/1/snapvol.sock", "ssh://h", True),      # found by discovery
    ("ssh://h:2222", "ssh://h", False),
    ("unix:///run/a.sock", "unix:///run/b.sock", False),
])
def test_same_host_tells_two_snapvols_of_one_host_apart(a, b, same):
    assert same_host(a, b) is same and same_host(b, a) is same
