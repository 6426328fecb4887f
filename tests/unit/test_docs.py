"""The README's tables cannot drift from the code's settings and options."""

from __future__ import annotations

from pathlib import Path

import pytest

from plugin import options
from plugin.config import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


@pytest.mark.parametrize("field", sorted(Settings.SPEC))
def test_every_setting_is_documented(field):
    variable = Settings.SPEC[field][0]
    assert f"| `{variable}` |" in README


@pytest.mark.parametrize("name", options.accepted("btrfs"))
def test_every_btrfs_option_is_documented(name):
    assert f"`{name}`" in README.split("### Volume options")[1].split("###")[0]


def test_both_setup_commands_are_in_the_readme():
    assert "./scripts/run\n" in README and "./scripts/test\n" in README


def test_the_production_compose_example_is_the_tested_file():
    tested = (Path(__file__).resolve().parents[1] / "e2e" / "compose" / "production"
              / "docker-compose.yml").read_text()
    assert f"```yaml\n{tested}```" in README
