"""The recycler's decision (plugin.recycle): a fresh worker only after a large drop of
volumes, once their number has stayed put for the quiet time, when idle, and only once. The
real replacement by gunicorn is tested in tests/integration/test_recycle.py."""

from __future__ import annotations

import pytest

from plugin.config import Settings
from plugin.errors import ConfigError
from plugin.recycle import Recycler


class World:
    def __init__(self, drop: int = 100, quiet: float = 60) -> None:
        self.now = 0.0
        self.volumes = 0
        self.busy = False
        self.asked = 0
        self.recycler = Recycler(count=lambda: self.volumes, idle=lambda: not self.busy,
                                 drop=drop, quiet=quiet, replace=self.replace,
                                 clock=lambda: self.now)

    def replace(self) -> None:
        self.asked += 1

    def at(self, seconds: float, volumes: int) -> bool:
        self.now, self.volumes = seconds, volumes
        return self.recycler.look()


def test_a_drop_below_the_peak_asks_once_after_the_quiet_time():
    world = World(drop=100, quiet=60)
    assert not world.at(0, 50)
    assert not world.at(10, 500)                # the peak
    assert not world.at(20, 401)                # 99 fewer: not enough
    assert not world.at(100, 401)
    assert not world.at(110, 400)               # 100 fewer, but it just changed
    assert not world.at(169, 400)
    assert world.at(170, 400) and world.asked == 1
    assert not world.at(500, 0) and world.asked == 1     # never twice in one worker


def test_it_waits_while_anything_goes_on_and_while_volumes_keep_changing():
    world = World(drop=10, quiet=5)
    world.at(0, 1000)
    for second in range(1, 20):                 # a removal burst: changes every second
        assert not world.at(second, 1000 - 50 * second)
    world.busy = True
    assert not world.at(100, 50)
    assert not world.at(200, 50)                # a long transfer, a scheduler pass...
    world.busy = False
    assert world.at(201, 50) and world.asked == 1


def test_growth_alone_or_a_drop_that_came_back_asks_nothing():
    world = World(drop=100, quiet=1)
    for second, volumes in enumerate([10, 2000, 5000, 4950, 5000, 6000]):
        assert not world.at(second * 100, volumes)
    assert world.asked == 0


def test_drop_zero_turns_it_off():
    world = World(drop=0, quiet=1)
    world.at(0, 10_000)
    assert not world.at(1000, 0) and world.asked == 0
    world.recycler.start()                      # no thread either
    assert world.recycler._thread is None


@pytest.mark.parametrize("drop, quiet, message", [
    ("-1", "60", "SNAPVOL_RECYCLE_DROP='-1': must be a whole number of volumes"),
    ("1e3", "60", "SNAPVOL_RECYCLE_DROP='1e3'"),
    ("100000000", "60", "SNAPVOL_RECYCLE_DROP='100000000'"),
    ("1000", "0", "SNAPVOL_RECYCLE_QUIET='0': must be a number of seconds"),
    ("1000", "x", "SNAPVOL_RECYCLE_QUIET='x'"),
])
def test_bad_settings_are_refused_by_name(drop, quiet, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        Settings.from_env({"SNAPVOL_RECYCLE_DROP": drop, "SNAPVOL_RECYCLE_QUIET": quiet})


def test_the_defaults():
    settings = Settings.from_env({})
    assert (settings.recycle_drop, settings.recycle_quiet) == (1000, 60.0)
