"""What a failed ZFS receive leaves, on a resumable (OpenZFS-like) pool that no machine here
has: a stream cut short keeps its state for a resume; one that ``zfs receive`` itself refused
keeps nothing, and says why in zfs's words. ``zfs receive`` is played by a small Python
program (argv, no shell); the pool by a record of datasets and the calls made."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from plugin.backends.zfs_receive import Receiver
from plugin.errors import CommandFailed

ROOT = "tank/snapvol"
# reads a little, then fails as zfs receive does on a damaged stream (or takes it all)
REFUSES = ("import sys; sys.stdin.buffer.read(4096); "
           "sys.stderr.write('cannot receive new filesystem stream: invalid stream (checksum mismatch)\\n');"
           " sys.exit(1)")
TAKES_ALL = "import sys; sys.stdin.buffer.read()"


class Pool:
    """The calls Receiver makes on ZfsCommands and Layout, recorded; *token* is what a failed
    receive leaves behind (as OpenZFS -s does)."""

    resumable = True
    root = ROOT

    def __init__(self, program: str, *, snapshots: list[str], makes: str | None = None) -> None:
        self.program = program
        self.makes = makes            # the snapshot this receive makes (zfs took it all)
        self.datasets: dict[str, dict[str, str]] = {f"{ROOT}/copy": {}}
        self.snaps = snapshots
        self.calls: list[tuple] = []

    # ZfsCommands
    def get(self, dataset, props, *, missing_ok=False):
        if dataset not in self.datasets:
            return None
        return {p: self.datasets[dataset].get(p, "-") for p in props}

    def receive_argv(self, dataset, *, force):
        self.datasets.setdefault(dataset, {})["receive_resume_token"] = "1-abc"
        if self.makes:
            self.snaps.append(self.makes)
        return [sys.executable, "-c", self.program]

    def abort_receive(self, dataset):
        self.calls.append(("abort", dataset))
        if dataset.split("/")[-1].startswith("recv:"):
            del self.datasets[dataset]
        else:
            self.datasets[dataset].pop("receive_resume_token", None)

    def rollback(self, snapshot):
        self.calls.append(("rollback", snapshot))

    def mount(self, dataset, mountpoint):
        pass

    def unmount(self, dataset):
        pass

    # Layout
    def dataset(self, name):
        return f"{ROOT}/{name}"

    def mountpoint(self, name):
        return Path("/nonexistent") / name

    def is_mounted(self, mountpoint):
        return False

    def owned_snapshot(self, volume, snapshot):
        return f"{ROOT}/{volume}@{snapshot}"

    def snapshots(self, dataset, volume):
        return dict.fromkeys(self.snaps)

    def destroy(self, dataset, *, mounted):
        self.calls.append(("destroy", dataset))
        del self.datasets[dataset]


def receive(pool: Pool, base: str | None, *, cut: bool = False) -> None:
    receiver = Receiver(pool, pool)   # type: ignore[arg-type]
    with receiver.receiving("copy" if base else "new", "s2", base, {}) as pipe:
        for _ in range(64):
            pipe.write(b"\0" * 65536)
            if cut:
                raise ConnectionError("the sender went away")


def test_a_full_stream_refused_by_zfs_receive_says_why_and_keeps_no_state():
    pool = Pool(REFUSES, snapshots=[])
    with pytest.raises(CommandFailed, match=r"invalid stream \(checksum mismatch\)"):
        receive(pool, None)
    assert f"{ROOT}/recv:new" not in pool.datasets
    assert ("abort", f"{ROOT}/recv:new") in pool.calls


def test_a_full_stream_cut_short_keeps_its_state_for_a_resume():
    pool = Pool(TAKES_ALL, snapshots=[])
    with pytest.raises(ConnectionError):
        receive(pool, None, cut=True)
    assert pool.datasets[f"{ROOT}/recv:new"]["receive_resume_token"] == "1-abc"
    assert pool.calls == []


def test_an_incremental_stream_refused_by_zfs_receive_keeps_no_state():
    pool = Pool(REFUSES, snapshots=["s1"])
    with pytest.raises(CommandFailed, match="checksum mismatch"):
        receive(pool, "s1")
    assert pool.calls == [("abort", f"{ROOT}/copy")]
    assert "receive_resume_token" not in pool.datasets[f"{ROOT}/copy"]


def test_an_incremental_stream_cut_short_keeps_its_state_for_a_resume():
    pool = Pool(TAKES_ALL, snapshots=["s1"])
    with pytest.raises(ConnectionError):
        receive(pool, "s1", cut=True)
    assert pool.calls == []
    assert pool.datasets[f"{ROOT}/copy"]["receive_resume_token"] == "1-abc"


def test_an_incremental_stream_zfs_took_whole_before_it_was_refused_is_rolled_back():
    """zfs made the snapshot (the native stream was whole) but the envelope then failed."""
    pool = Pool(TAKES_ALL, snapshots=["s1"], makes="s2")
    with pytest.raises(ConnectionError):
        receive(pool, "s1", cut=True)
    assert ("rollback", f"{ROOT}/copy@s1") in pool.calls
