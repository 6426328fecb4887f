"""plugin.announce: dockerd is asked to look the driver up only when it does not list it
(the real proof, a Swarm node that learns the driver with no command typed, is in
tests/e2e/test_swarm.py)."""

from __future__ import annotations

from plugin.announce import DriverAnnouncer


class FakeDocker:
    """dockerd's /info and /volumes as the announcer uses them: listing the volumes makes
    dockerd register every legacy driver it finds (*found*)."""

    def __init__(self, listed: list[str], found: list[str]) -> None:
        self.listed, self.found = list(listed), found
        self.volume_lists = 0
        self.closed = 0

    def info(self) -> dict:
        return {"Plugins": {"Volume": list(self.listed)}}

    def list_volumes(self) -> None:
        self.volume_lists += 1
        self.listed += [d for d in self.found if d not in self.listed]

    def close(self) -> None:
        self.closed += 1


def test_a_listed_driver_costs_one_info_call_and_nothing_else():
    docker = FakeDocker(["local", "snapvol"], ["snapvol"])
    assert DriverAnnouncer("unix:///x", "snapvol", client=lambda: docker).check()
    assert docker.volume_lists == 0 and docker.closed == 1


def test_a_missing_driver_is_looked_up_by_listing_the_volumes():
    docker = FakeDocker(["local"], ["snapvol"])
    announcer = DriverAnnouncer("unix:///x", "snapvol", client=lambda: docker)
    assert announcer.check()
    assert docker.volume_lists == 1 and "snapvol" in docker.listed
    assert announcer.check() and docker.volume_lists == 1     # not again once listed


def test_a_driver_dockerd_cannot_find_is_reported_not_raised():
    docker = FakeDocker(["local"], [])
    assert not DriverAnnouncer("unix:///x", "snapvol", client=lambda: docker).check()
    assert docker.volume_lists == 1


def test_no_dockerd_is_not_an_error():
    def unreachable():
        raise ConnectionRefusedError("no dockerd")
    assert not DriverAnnouncer("unix:///x", "snapvol", client=unreachable).check()

