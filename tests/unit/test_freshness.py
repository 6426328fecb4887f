"""``snapvol check --freshness``: the thresholds (multiples of each interval, pool percent)
and the Nagios exit codes, from the facts as the plugin answers them."""

from __future__ import annotations

import io
from datetime import datetime, timedelta, timezone

import pytest

from plugin.cli import main
from plugin.freshness import Level, Thresholds, assess, human, summary

NOW = datetime(2026, 1, 10, 12, 0, tzinfo=timezone.utc)
HOUR = 3600.0


def at(seconds_ago: float) -> str:
    return (NOW - timedelta(seconds=seconds_ago)).isoformat().replace("+00:00", "Z")


def facts(*volumes: dict, size: int = 1000 << 20, available: int = 900 << 20, error=None) -> dict:
    return {"at": at(0), "volumes": list(volumes), "error": error,
            "pool": {"size_bytes": size, "available_bytes": available}}


def volume(name: str = "pg", *, newest: float | None = 0, interval: float | None = HOUR,
           created: float = 30 * 86400, role=None, targets=()) -> dict:
    return {"name": name, "created": at(created), "newest": None if newest is None else at(newest),
            "snapshots": 0 if newest is None else 3, "interval": interval, "role": role,
            "targets": list(targets)}


def target(lag: float | None, *, interval: float | None = HOUR, failed=False, kind="replicate"):
    return {"target": "ssh://backup", "kind": kind, "interval": interval, "last_failed": failed,
            "last_success": None if lag is None else at(lag),
            "synced_created": None if lag is None else at(lag)}


def levels(found) -> list[tuple[str, str]]:
    return [(f.level.name, f.kind) for f in found]


@pytest.mark.parametrize("age, expected", [
    (0, []), (1.5 * HOUR, []), (1.5 * HOUR + 1, [("WARN", "snapshot age")]),
    (3 * HOUR, [("WARN", "snapshot age")]), (3 * HOUR + 1, [("CRIT", "snapshot age")])])
def test_snapshot_age_in_intervals(age, expected):
    assert levels(assess(facts(volume(newest=age)), Thresholds())) == expected


def test_a_volume_without_snapshots_counts_from_its_creation():
    young = volume(newest=None, created=HOUR)
    old = volume("old", newest=None, created=4 * HOUR)
    found = assess(facts(young, old), Thresholds())
    assert levels(found) == [("CRIT", "snapshot age")]
    assert "volume old: no snapshot yet, created 4h ago" in found[0].what


def test_unscheduled_volumes_and_standbys_are_not_judged_by_age():
    found = assess(facts(volume(newest=100 * HOUR, interval=None),
                         volume("sb", newest=100 * HOUR, role="standby")), Thresholds())
    assert found == []


@pytest.mark.parametrize("lag, expected", [
    (2 * HOUR, []), (2 * HOUR + 1, [("WARN", "replication lag")]),
    (4 * HOUR + 1, [("CRIT", "replication lag")])])
def test_replica_lag_in_intervals(lag, expected):
    assert levels(assess(facts(volume(targets=[target(lag)])), Thresholds())) == expected


def test_a_replica_never_synced_and_failing_says_so():
    found = assess(facts(volume(created=10 * HOUR, targets=[target(None, failed=True, kind="standby")])),
                   Thresholds())
    assert levels(found) == [("CRIT", "replication lag")]
    assert "standby ssh://backup: never synced, its last attempt failed" in found[0].what


def test_targets_replicated_by_hand_have_no_cadence():
    assert assess(facts(volume(targets=[target(100 * HOUR, interval=None, kind="manual")])),
                  Thresholds()) == []


@pytest.mark.parametrize("used_percent, expected", [(79, []), (80, [("WARN", "pool")]),
                                                    (90, [("CRIT", "pool")])])
def test_pool_fill(used_percent, expected):
    found = assess(facts(size=100 << 20, available=(100 - used_percent) << 20), Thresholds())
    assert levels(found) == expected


def test_thresholds_are_settable_and_worst_comes_first():
    limits = Thresholds(warn_age=0.5, crit_age=10, warn_pool=10, crit_pool=50)
    found = assess(facts(volume(newest=HOUR), available=400 << 20), limits)
    assert levels(found) == [("CRIT", "pool"), ("WARN", "snapshot age")]
    assert summary({}, found)[0] is Level.CRIT


def test_storage_that_cannot_be_read_is_critical():
    assert levels(assess(facts(error="pool gone"), Thresholds())) == [("CRIT", "storage")]


@pytest.mark.parametrize("limits", [Thresholds(warn_age=3, crit_age=2), Thresholds(warn_lag=0),
                                    Thresholds(crit_pool=120)])
def test_inconsistent_thresholds_are_refused(limits):
    with pytest.raises(ValueError):
        limits.check()


def test_human_durations():
    assert [human(s) for s in (5, 90, 3600, 3 * 3600 + 600, 2 * 86400 + 4 * 3600)] == \
        ["5s", "1m", "1h", "3h10m", "2d4h"]


class Answer:
    """What the plugin socket answers (the CLI's transport; the judging is real)."""

    def __init__(self, status: int, reply: dict) -> None:
        self.status, self.reply, self.asked = status, reply, []

    def __call__(self, socket_path: str) -> Answer:
        return self

    def call(self, endpoint: str, body: dict) -> tuple[int, dict]:
        self.asked.append(endpoint)
        return self.status, self.reply


def run(*args: str, answer=None) -> tuple[int, str]:
    out = io.StringIO()
    code = main(["--socket", "/nonexistent.sock", "check", "--freshness", *args], stdout=out,
                stderr=io.StringIO(), **({"connect": answer} if answer else {}))
    return code, out.getvalue()


@pytest.mark.parametrize("newest, code, first", [(0, 0, "OK: 1 scheduled volume(s) fresh"),
                                                 (2 * HOUR, 1, "WARN snapshot age: volume pg"),
                                                 (5 * HOUR, 2, "CRIT snapshot age: volume pg")])
def test_cli_exit_codes(newest, code, first):
    answer = Answer(200, {"Err": "", "Freshness": facts(volume(newest=newest))})
    got, out = run(answer=answer)
    assert (got, out.splitlines()[0][:len(first)]) == (code, first)
    assert answer.asked == ["Snapvol.Freshness"]


def test_cli_thresholds_from_flags():
    answer = Answer(200, {"Err": "", "Freshness": facts(volume(newest=2 * HOUR))})
    assert run("--warn-age", "3", "--crit-age", "5", answer=answer)[0] == 0
    assert run("--warn-age", "1", "--crit-age", "1.9", answer=answer)[0] == 2


def test_cli_unknown_when_the_plugin_cannot_be_asked():
    code, out = run()                        # no such socket
    assert code == 3 and out.startswith("UNKNOWN: cannot ask the plugin")
    code, out = run(answer=Answer(500, {"Err": "boom"}))
    assert code == 3 and "boom" in out
    code, out = run("--repair", answer=Answer(200, {}))
    assert code == 3 and "--repair" in out
    code, out = run("--warn-pool", "95", answer=Answer(200, {}))
    assert code == 3 and "--warn-pool" in out


def test_cli_json_lists_the_findings():
    import json
    answer = Answer(200, {"Err": "", "Freshness": facts(volume(newest=5 * HOUR))})
    code, out = run("--json", answer=answer)
    parsed = json.loads(out)
    assert code == 2 and parsed["Status"] == "CRIT"
    assert [f["kind"] for f in parsed["Findings"]] == ["snapshot age"]


def verify(passed: float | None, *, interval: float | None = 86400.0, failed=False) -> dict:
    return {"interval": interval, "last": at(0), "last_failed": failed,
            "last_success": None if passed is None else at(passed)}


@pytest.mark.parametrize("passed,failed,expected", [
    (3600, False, []),                                          # passed an hour ago: fine
    (2 * 86400, False, [("WARN", "verification")]),             # 2 intervals: warn
    (4 * 86400, False, [("CRIT", "verification")]),             # past 3: crit
    (3600, True, [("WARN", "verification")]),                   # the newest did not pass
    (None, False, [("CRIT", "verification")]),                  # none ever, created 30 d ago
])
def test_validated_restores_are_judged_by_the_age_of_the_last_pass(passed, failed, expected):
    found = assess(facts({**volume(), "verify": verify(passed, failed=failed)}), Thresholds())
    assert levels(found) == expected
    if failed:
        assert "did not pass" in found[0].what


def test_a_volume_verified_by_hand_only_is_judged_by_its_last_result():
    by_hand = verify(40 * 86400, interval=None)
    assert assess(facts({**volume(), "verify": by_hand}), Thresholds()) == []
    assert levels(assess(facts({**volume(), "verify": {**by_hand, "last_failed": True}}),
                         Thresholds())) == [("WARN", "verification")]
