"""The shipped monitoring files: the alert rules pass promtool (and its unit tests of them),
the dashboard is valid JSON whose queries name only snapvol's metrics, and SNAPVOL_METRICS
parses. That those names are really exported is checked against a real plugin's scrape in
tests/e2e/test_metrics.py (:func:`referenced_metrics` is shared)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from plugin.config import Settings
from plugin.errors import ConfigError
from tests.conftest import need

MONITORING = Path(__file__).resolve().parents[2] / "scripts" / "monitoring"
RULES = MONITORING / "snapvol-alerts.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
METRIC = re.compile(r"\bsnapvol_[a-z0-9_]+")


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def rule_queries() -> list[str]:
    rules = yaml.safe_load(RULES.read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def referenced_metrics() -> set[str]:
    """Every snapvol_* series name the dashboard and the alert rules query."""
    return {m for expr in dashboard_queries() + rule_queries() for m in METRIC.findall(expr)}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    need("promtool", root=False)
    return subprocess.run(["promtool", *args], cwd=MONITORING, capture_output=True, text=True,
                          timeout=120)


def test_the_alert_rules_pass_promtool_check():
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_alerts_fire_as_their_unit_tests_say():
    """snapvol-alerts.test.yml: a stale volume warns at 1.5 intervals and is critical at 3,
    a fresh one never fires, a lagging replica warns at 2 intervals."""
    result = promtool("test", "rules", "snapvol-alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dashboard_is_json_with_a_query_in_every_panel():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        assert all(METRIC.search(t["expr"]) for t in panel["targets"]), panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_the_dashboard_and_rules_name_metrics_the_code_defines():
    """A fast guard against a renamed metric (the real scrape is in the e2e test)."""
    source = (Path(__file__).resolve().parents[2] / "plugin" / "metrics.py").read_text()
    for name in referenced_metrics():
        base = re.sub(r"_(bucket|count|sum|total)$", "", name)
        assert f'"{base}"' in source or f'"{name}"' in source, name


@pytest.mark.parametrize("raw, parsed", [
    ("off", None), ("127.0.0.1:9618", ("127.0.0.1", 9618)), ("[::1]:9618", ("::1", 9618)),
    ("localhost:1", ("localhost", 1)), ("0.0.0.0:65535", ("0.0.0.0", 65535))])
def test_metrics_setting_parses(raw, parsed):
    assert Settings.from_env({"SNAPVOL_METRICS": raw}).metrics == parsed


@pytest.mark.parametrize("raw", ["on", "9618", ":9618", "127.0.0.1:0", "127.0.0.1:70000",
                                 "example.com:9618", "127.0.0.1:9618 ", ""])
def test_metrics_setting_refuses_nonsense(raw):
    with pytest.raises(ConfigError, match="SNAPVOL_METRICS"):
        Settings.from_env({"SNAPVOL_METRICS": raw})


def test_metrics_are_off_by_default():
    assert Settings.from_env({}).metrics is None
