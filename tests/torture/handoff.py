"""Hand-off torture: planned hand-offs of a standby volume back and forth between two plugins,
with either side SIGKILLed at a random moment of each one (issue 16: "a hand-off interrupted at
any point by kill -9 of either side").

``python -m tests.torture.handoff [--kills N] [--seed S] [--backend btrfs|zfs|all]``;
scripts/torture runs its CI slice (12 kills per backend) after the crash torture.

Two plugins, A and B (:class:`tests.torture.torture.Instance`: each its own loop-mounted Btrfs
or zfs-fuse pool and socket, advertising that socket). One volume, primary on A with B as its
standby (``sync=1h``: it syncs only when the test asks). Each round, on whichever side is
primary now:

1. Mount (a new ID), write ``round-K`` (2 MiB, fsync'd), Unmount: the write the hand-off
   must keep.
2. Start a hand-off to the other side, one of the two ways one starts: *push*
   (``Snapvol.Handoff`` on the primary, what ``snapvol handoff`` sends) or *pull*
   (``VolumeDriver.Mount`` on the standby, what dockerd on the next node sends); and SIGKILL
   one side, picked at random, after a random delay within twice the longer of a push's
   and a pull's duration measured in round 0 (so the kill lands in any of its steps: fence,
   final snapshot, the stream, the target's promote, the source stepping down, and after).
3. Restart the killed side, then let the two settle: a ``Snapvol.Sync`` on the side that says
   it is primary (it resolves a hand-off left in doubt by asking the target), and an Unmount of
   the pull's mount ID where that Mount may have succeeded.
4. The invariant: exactly one side is primary and not fenced, the other is its standby at the
   same epoch; the primary mounts and holds every ``round-*`` file written so far (no write
   lost); neither side set a copy aside (a planned hand-off never makes ``NAME-diverged-*``).
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.torture.torture import (Instance, Killed, keep_logs, out, preflight, remove_base,
                                   storage)

CI_KILLS = 12
ROUND_BYTES = 2 << 20
SETTLE_TIMEOUT = 60.0


class Round:
    """What one interrupted hand-off did, for the report line."""

    def __init__(self) -> None:
        self.answer: tuple[int, dict[str, Any]] | None = None
        self.error: str | None = None


def settle(a: Instance, b: Instance, volume: str) -> tuple[Instance, Instance, list[str]]:
    """Until one side is an unfenced primary and the other its standby: (primary, standby,
    problems). A primary left fenced by a hand-off in doubt is asked to sync, which makes it
    ask the target what happened."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        roles = {inst: inst.call("Snapvol.Role", {"Volume": volume}) for inst in (a, b)}
        for inst, (status, reply) in roles.items():
            if status != 200:
                return a, b, [f"{inst.role}: Snapvol.Role answered {status}: {reply}"]
        primaries = [i for i, (_, r) in roles.items() if r["Role"] == "primary"]
        serving = [i for i in primaries if not roles[i][1].get("Fenced")]
        if len(serving) == 1 and len(primaries) == 1:
            primary = serving[0]
            standby = b if primary is a else a
            mine, theirs = roles[primary][1], roles[standby][1]
            problems = []
            if theirs["Role"] != "standby" or theirs["Epoch"] != mine["Epoch"]:
                problems.append(f"{standby.role} is {theirs['Role']} at epoch {theirs['Epoch']}, "
                                f"the primary {primary.role} at {mine['Epoch']}")
            return primary, standby, problems
        if len(primaries) == 2 and len(serving) == 2:
            return a, b, [f"two primaries serving: {roles}"]
        if time.monotonic() > deadline:
            return a, b, [f"not settled after {SETTLE_TIMEOUT:.0f} s: "
                          + "; ".join(f"{i.role}: {r}" for i, (_, r) in roles.items())]
        for inst in primaries:            # a fenced primary: its sync resolves the doubt
            inst.call("Snapvol.Sync", {"Volume": volume})
        time.sleep(0.5)


def mount(inst: Instance, volume: str, mount_id: str) -> Path:
    status, reply = inst.call("VolumeDriver.Mount", {"Name": volume, "ID": mount_id})
    if status != 200:
        raise AssertionError(f"{inst.role}: Mount of the primary refused: {reply}")
    return Path(reply["Mountpoint"])


def write_round(inst: Instance, volume: str, k: int) -> None:
    mount_id = secrets.token_hex(32)
    path = mount(inst, volume, mount_id)
    try:
        fd = os.open(path / f"round-{k}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, os.urandom(ROUND_BYTES))   # a delta worth streaming: kills land in it
            os.fsync(fd)
        finally:
            os.close(fd)
        dirfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
    finally:
        inst.call("VolumeDriver.Unmount", {"Name": volume, "ID": mount_id})


def rounds_on(inst: Instance, volume: str) -> set[int]:
    mount_id = secrets.token_hex(32)
    path = mount(inst, volume, mount_id)
    try:
        return {int(p.name.split("-", 1)[1]) for p in path.iterdir() if p.name.startswith("round-")}
    finally:
        inst.call("VolumeDriver.Unmount", {"Name": volume, "ID": mount_id})


def start_handoff(way: str, primary: Instance, standby: Instance, volume: str,
                  mount_id: str) -> tuple[threading.Thread, Round]:
    """The hand-off, in a thread (its answer, or that its caller's plugin died, in the Round)."""
    result = Round()

    def run() -> None:
        try:
            if way == "push":
                result.answer = primary.call("Snapvol.Handoff",
                                             {"Volume": volume, "Target": f"unix://{standby.socket}"})
            else:
                result.answer = standby.call("VolumeDriver.Mount", {"Name": volume, "ID": mount_id})
        except (Killed, TimeoutError) as exc:
            result.error = str(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def diverged(inst: Instance, volume: str) -> list[str]:
    status, reply = inst.call("VolumeDriver.List")
    if status != 200:
        return [f"{inst.role}: List answered {status}"]
    return [v["Name"] for v in reply["Volumes"] if v["Name"].startswith(f"{volume}-diverged")]


def torture(backend: str, kills: int, seed: int, a: Instance, b: Instance) -> int:
    rng = random.Random(seed)
    volume = f"ho{secrets.token_hex(4)}"
    for inst in (a, b):
        inst.start()
    status, reply = a.call("VolumeDriver.Create", {"Name": volume, "Opts": {
        "standby": f"unix://{b.socket}", "sync": "1h"}})
    if status != 200:
        out(f"create: {reply}")
        return 1
    written: set[int] = set()
    primary, standby = a, b
    status, reply = primary.call("Snapvol.Sync", {"Volume": volume})   # the seed (full)
    if status != 200 or any(reply["Results"].values()):
        out(f"first sync: {reply}")
        return 1
    # round 0: an uninterrupted hand-off each way a hand-off starts (incremental, as all the
    # others), to measure how long one takes here. The kills below land within twice the
    # longer, so in every step and after the end: a hand-off in a round with a kill is slower
    # than these (the side killed in the round before starts cold). With the push alone and
    # 1.2 times, a ZFS hand-off made faster by the dataset index was killed before its end
    # in 12 rounds of 12, three runs running (1.5 times: still 12 of 12): the kills after a
    # move, and during its last steps, were never tried.
    durations = []
    for way in ("push", "pull"):
        write_round(primary, volume, len(durations))
        written.add(len(durations))
        mount_id = secrets.token_hex(32)
        started = time.monotonic()
        if way == "push":
            status, reply = primary.call("Snapvol.Handoff", {"Volume": volume,
                                                             "Target": f"unix://{standby.socket}"})
        else:
            status, reply = standby.call("VolumeDriver.Mount", {"Name": volume, "ID": mount_id})
        durations.append(time.monotonic() - started)
        if status != 200 or reply.get("Err"):
            out(f"round 0: {way} hand-off refused: {reply}")
            return 1
        if way == "pull":
            standby.call("VolumeDriver.Unmount", {"Name": volume, "ID": mount_id})
        primary, standby = standby, primary
    duration = max(durations)
    out(f"round 0: a hand-off without a kill takes {durations[0]:.2f} s (push), "
        f"{durations[1]:.2f} s (pull) here")
    outcomes: Counter[str] = Counter()
    failures = 0
    for k in range(1, kills + 1):
        write_round(primary, volume, k + 1)     # rounds 0 and 1: round 0
        written.add(k + 1)
        way = rng.choice(("push", "pull"))
        victim = rng.choice((primary, standby))
        delay = rng.uniform(0, duration * 2)
        mount_id = secrets.token_hex(32)
        old_primary = primary
        thread, result = start_handoff(way, primary, standby, volume, mount_id)
        time.sleep(delay)
        victim.kill()
        thread.join(120)
        victim.start()
        if way == "pull":               # the pulled Mount may have succeeded: let it go
            try:
                standby.call("VolumeDriver.Unmount", {"Name": volume, "ID": mount_id})
            except Killed:
                pass
        primary, standby, problems = settle(a, b, volume)
        if not problems:
            missing = written - rounds_on(primary, volume)
            if missing:
                problems.append(f"rounds lost on the primary {primary.role}: {sorted(missing)}")
            for inst in (a, b):
                problems += [f"{inst.role} set a copy aside: {n}" for n in diverged(inst, volume)]
        moved = "moved" if primary is not old_primary else "stayed"
        answer = (f"answered {result.answer[0]}" if result.answer is not None
                  else "its caller was killed")
        outcomes[moved] += 1
        out(f"kill {k:3d}/{kills} {backend:5} {way} hand-off {old_primary.role}->"
            f"{'b' if old_primary is a else 'a'}, {victim.role} killed after {delay:.2f} s "
            f"({answer}) | {moved}: primary {primary.role} | "
            + ("ok" if not problems else "FAILED: " + "; ".join(problems)))
        if problems:
            failures += 1
            break
    out(f"summary {backend}: {kills} hand-offs killed, {dict(outcomes)}, invariant failures "
        f"{failures}")
    return 1 if failures else 0


def run_backend(backend: str, kills: int, seed: int) -> int:
    preflight(backend)
    base = Path(tempfile.mkdtemp(prefix=f"svh-{backend}-", dir="/tmp"))
    instances: list[Instance] = []
    code = 1
    try:
        with storage(backend, base) as (a_env, a_root, b_env, b_root):
            a = Instance("a", backend, base, a_env, a_root)
            b = Instance("b", backend, base, b_env, b_root)
            instances += [a, b]
            try:
                code = torture(backend, kills, seed, a, b)
            finally:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                for inst in instances:
                    inst.stop()
                if code:
                    keep_logs(instances, Path(f"/tmp/snapvol-handoff-logs-{seed}-{backend}"),
                              backend, "handoff torture")
        return code
    except KeyboardInterrupt:
        out(f"handoff torture {backend}: interrupted; cleaned up")
        return 130
    finally:
        remove_base(base)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.torture.handoff",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=CI_KILLS,
                        help=f"interrupted hand-offs per backend (default {CI_KILLS}: the CI slice)")
    parser.add_argument("--seed", type=int, default=None, help="replay a run (printed first)")
    parser.add_argument("--backend", choices=["btrfs", "zfs", "all"], default="all")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else secrets.randbelow(10**9)
    out(f"handoff torture seed {seed} (replay: python -m tests.torture.handoff --seed {seed} "
        f"--kills {args.kills} --backend {args.backend})")

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    codes = {}
    for backend in (["btrfs", "zfs"] if args.backend == "all" else [args.backend]):
        codes[backend] = run_backend(backend, args.kills, seed)
        if codes[backend] == 130:
            return 130
    out("handoff torture: " + ", ".join(f"{b} exit {c}" for b, c in codes.items()))
    return 1 if any(codes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
