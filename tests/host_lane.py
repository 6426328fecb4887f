"""The host lane of scripts/test, in two sides that run at the same time.

``python -m tests.host_lane LOGDIR``; ``python -m tests.host_lane --early`` runs what uses
zfs-fuse (the tortures' halves, the integration tier's tests), which scripts/test runs
beforehand, beside the plugin's build.

* **The waiting side**: the end-to-end tier (``pytest tests/e2e``), which spends most of its
  time waiting on dockerd, containers, timers and the filesystems (the CPU was measured 75 %
  idle while it ran alone). It starts at once and prints to this process's output.
* **The working side**, niced so that it yields the CPU to the first: the Btrfs halves of the
  crash torture's CI slice and of the hand-off torture's, then the unit tier and the
  integration tier on Btrfs and the fake backend. Its output goes to ``LOGDIR/working-side.log`` and is printed when both sides have
  ended.

Both sides use one ZFS: where the kernel has none, one zfs-fuse is started here for both and
stopped at the end (:func:`tests.conftest.zfs_running`; each side alone would stop its own
under the other). Exit status 0 when every step of both sides passed, else 1. A step's failure
does not stop the steps after it, as in scripts/test: one run shows every failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import zfs_running

PYTHON = sys.executable
WORKING_NICENESS = 10          # as the OpenZFS VM beside: the two share what the e2e tier leaves
E2E = [PYTHON, "-m", "pytest", "-p", "no:cacheprovider", "--durations=15", "tests/e2e"]
PYTEST = [PYTHON, "-m", "pytest", "-p", "no:cacheprovider", "--durations=10"]
# What uses zfs-fuse runs first, beside the plugin's build (scripts/test), never beside the
# end-to-end tier, whose zfs-fuse plugins share the one zfs-fuse daemon: every dockerd volume
# lookup asks them too, and a zfs-fuse busy with a torture made them wait past Compose's 60 s;
# an incremental receive of the integration tier beside them was answered "I/O error".
EARLY_STEPS = [
    ("crash torture (CI slice, zfs-fuse)", [PYTHON, "-m", "tests.torture.torture", "--backend", "zfs"]),
    ("hand-off torture (CI slice, zfs-fuse)", [PYTHON, "-m", "tests.torture.handoff", "--backend", "zfs"]),
    ("integration tier on zfs-fuse", [*PYTEST, "tests/integration", "-k", "zfs"]),
]
WORKING_STEPS = [
    ("crash torture (CI slice, Btrfs)", [PYTHON, "-m", "tests.torture.torture", "--backend", "btrfs"]),
    ("hand-off torture (CI slice, Btrfs)", [PYTHON, "-m", "tests.torture.handoff", "--backend", "btrfs"]),
    ("unit tier", [*PYTEST, "tests/unit"]),
    ("integration tier on Btrfs and the fake", [*PYTEST, "tests/integration", "-k", "not zfs"]),
]


def log(message: str) -> None:
    print(f"snapvol: {message}", flush=True)


def run_steps(steps: list[tuple[str, list[str]]]) -> int:
    """*steps* one after the other, each timed; 1 if any failed (all run regardless)."""
    failed = False
    for title, argv in steps:
        started = time.monotonic()
        code = subprocess.call(argv)
        log(f"{title}: {time.monotonic() - started:.0f} s (exit {code})")
        failed |= code != 0
    return 1 if failed else 0


def start_working_side(log_file: Path) -> subprocess.Popen:
    """Start the working side niced, in a session of its own, its output to *log_file*."""
    with log_file.open("wb") as out:
        return subprocess.Popen([PYTHON, "-m", "tests.host_lane", "--working-side"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: os.nice(WORKING_NICENESS))


def stop(process: subprocess.Popen) -> None:
    """Stop a side we started and everything it started (its own session)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def main(argv: list[str]) -> int:
    if argv == ["--working-side"]:
        return run_steps(WORKING_STEPS)
    if argv == ["--early"]:
        with zfs_running():
            return run_steps(EARLY_STEPS)
    if len(argv) != 1:
        print("usage: python -m tests.host_lane LOGDIR | --early", file=sys.stderr)
        return 2
    log_dir = Path(argv[0])
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / "working-side.log"
    with zfs_running():
        started = time.monotonic()
        working = start_working_side(log_file)
        log(f"host lane: the tortures, unit and integration tiers beside the end-to-end tier "
            f"(niced; their output: {log_file}, printed at the end)")
        try:
            e2e = subprocess.call(E2E)
            log(f"end-to-end tier: {time.monotonic() - started:.0f} s (exit {e2e})")
            working_code = working.wait()
        finally:
            stop(working)
        print("----- the working side: tortures, unit and integration tiers -----", flush=True)
        sys.stdout.buffer.write(log_file.read_bytes())
        print("----- end of the working side -----", flush=True)
        log(f"host lane: {time.monotonic() - started:.0f} s")
    return 1 if e2e or working_code else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
