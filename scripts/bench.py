"""The benchmark behind ``scripts/bench`` (see there). Not a test: it asserts nothing.

Latency is measured over one kept-alive HTTP connection per plugin, as dockerd's plugin
client does (a Go ``http.Transport``, keep-alive on), after a warm-up; the client's own
overhead is in every figure, for every plugin alike.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import btrfsutil  # noqa: E402  (Debian's, through the venv's system site-packages)

from plugin.client import PluginClient, UnixHTTPConnection  # noqa: E402
from tests.conftest import destroy_pool, make_btrfs, make_pool, unmount  # noqa: E402
from tests.e2e.harness import DockerDaemon, PluginProcess, mounts_under  # noqa: E402


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return (time.perf_counter() - started) * 1000


def summary(samples: list[float]) -> str:
    samples = sorted(samples)
    p95 = samples[min(len(samples) - 1, int(round(0.95 * (len(samples) - 1))))]
    return f"{statistics.median(samples):.2f} / {p95:.2f}"


class Target:
    """A plugin reached over its socket, plus a way to add volumes fast (to reach N)."""

    def __init__(self, label: str, socket: Path, populate: Callable[[str], None],
                 pids: Callable[[], list[int]]) -> None:
        self.label, self.socket, self.populate, self.pids = label, str(socket), populate, pids
        self._conn: UnixHTTPConnection | None = None

    def call(self, endpoint: str, body: dict) -> dict:
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = UnixHTTPConnection(self.socket, timeout=120)
            try:
                self._conn.request("POST", "/" + endpoint, body=json.dumps(body))
                reply = json.loads(self._conn.getresponse().read())
                break
            except (OSError, http.client.HTTPException):
                self._conn.close()
                self._conn = None        # the server closed an idle connection: reconnect once
                if attempt == 2:
                    raise
        if reply.get("Err"):
            raise RuntimeError(f"{self.label} {endpoint}: {reply['Err']}")
        return reply


IDLE_AFTER = 5.0      # seconds from the plugin's first answer to the idle memory figure


def memory_mib(pids: list[int]) -> tuple[float, float]:
    """(RSS, PSS) summed over *pids*, in MiB. The RSS sum counts a page shared by gunicorn's
    master and worker (most of the interpreter and gunicorn) once per process, as issue 17's
    goal does; PSS counts it once in all."""
    rss = pss = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "Rss":
                rss += int(value.split()[0])
            elif key == "Pss":
                pss += int(value.split()[0])
    return rss / 1024, pss / 1024


def descendants(pid: int) -> list[int]:
    """Every process below *pid* (gunicorn's worker, and whatever a worker keeps running),
    so that the memory row counts all of the plugin's processes."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [d for child in map(int, out.split()) for d in (child, *descendants(child))]


def latency_rows(target: Target, count: int, repeat: int) -> dict[str, str]:
    present = {v["Name"] for v in target.call("VolumeDriver.List", {})["Volumes"]}
    probe, index = "fill00000", 0
    while len(present) < count or probe not in present:   # other sections may have left some
        name = f"fill{index:05d}"
        if name not in present:
            target.populate(name)
            present.add(name)
        index += 1
    for _ in range(20):                      # warm-up: caches, connection
        target.call("VolumeDriver.Get", {"Name": probe})
    rows = {}
    rows["Get"] = summary([timed(lambda: target.call("VolumeDriver.Get", {"Name": probe}))
                           for _ in range(repeat)])
    rows["Path"] = summary([timed(lambda: target.call("VolumeDriver.Path", {"Name": probe}))
                            for _ in range(repeat)])
    mount_ms, unmount_ms = [], []
    for i in range(repeat):
        mount_id = secrets.token_hex(32)
        mount_ms.append(timed(lambda: target.call("VolumeDriver.Mount", {"Name": probe, "ID": mount_id})))
        unmount_ms.append(timed(lambda: target.call("VolumeDriver.Unmount", {"Name": probe, "ID": mount_id})))
    rows["Mount"], rows["Unmount"] = summary(mount_ms), summary(unmount_ms)
    # buttervolume's List and Create each run one `btrfs subvolume show` per volume (14 s at
    # 1,000): fewer repetitions at large counts keep the run in minutes
    rows["List"] = summary([timed(lambda: target.call("VolumeDriver.List", {}))
                            for _ in range(max(5, repeat // 10) if count <= 100 else 5)])
    names = [f"bench{secrets.token_hex(4)}" for _ in range(max(5, repeat // 5) if count <= 100 else 10)]
    rows["Create"] = summary([timed(lambda n=n: target.call("VolumeDriver.Create", {"Name": n, "Opts": {}}))
                              for n in names])
    rows["Remove"] = summary([timed(lambda n=n: target.call("VolumeDriver.Remove", {"Name": n}))
                              for n in names])
    return rows


@contextmanager
def buttervolume(binary: str, base: Path) -> Iterator[Target]:
    mnt = make_btrfs(base / "bv", size=12 << 30) if (base / "bv").mkdir() is None else None
    socket = base / "bv.sock"
    env = {"PATH": os.environ["PATH"], "BUTTERVOLUME_SOCKET": str(socket),
           "BUTTERVOLUME_VOLUMES_PATH": f"{mnt}/volumes/", "BUTTERVOLUME_SNAPSHOTS_PATH": f"{mnt}/snapshots/",
           "BUTTERVOLUME_SCHEDULE": str(base / "bv-schedule.csv"), "BUTTERVOLUME_LOGLEVEL": "WARNING"}
    log = (base / "bv.log").open("wb")
    proc = subprocess.Popen([binary, "run"], env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        for _ in range(100):
            if socket.exists():
                break
            time.sleep(0.1)
        # Filling through its API would take ~0.4 s a volume; a subvolume in its directory is
        # exactly what its Create makes.
        populate = lambda name: btrfsutil.create_subvolume(f"{mnt}/volumes/{name}")  # noqa: E731
        yield Target("buttervolume", socket, populate, lambda: [proc.pid])
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        unmount(mnt)


@contextmanager
def zfs_plugin(base: Path, env: dict[str, str] | None = None) -> Iterator[Target]:
    """snapvol with the ZFS backend on a pool of its own (zfs-fuse where no kernel ZFS);
    *env* adds settings."""
    started = None
    if not os.path.exists("/dev/zfs") and subprocess.run(["zpool", "list"], capture_output=True).returncode:
        pidfile = base / "zfs-fuse.pid"
        subprocess.run(["zfs-fuse", "--pidfile", str(pidfile)], check=True)
        for _ in range(100):
            if subprocess.run(["zpool", "list"], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        started = int(pidfile.read_text())
    pool = make_pool(base, size=8 << 30)
    process = PluginProcess(f"snapvolbenchz{secrets.token_hex(3)}", base / "zstate",
                            {"SNAPVOL_BACKEND": "zfs", "SNAPVOL_ZFS_ROOT": f"{pool}/snapvol",
                             "SNAPVOL_LOG_LEVEL": "warning", "SNAPVOL_RUN_DIR": str(base / "run" / "z"),
                             **(env or {})})
    try:
        process.start()
        target = Target("snapvol-zfs", process.socket,
                        lambda name: process.call("VolumeDriver.Create", {"Name": name}),
                        lambda: [process.pid, *descendants(process.pid)])
        target.zfs_root = f"{pool}/snapvol"     # type: ignore[attr-defined]
        yield target
    finally:
        process.stop()
        destroy_pool(pool)
        if started:
            os.kill(started, signal.SIGTERM)


def raw_zfs_ms(dataset: str) -> float:
    """One ``zfs list -H -o name <dataset>`` process, ms: the unit issue 17 compares with."""
    return timed(lambda: subprocess.run(["zfs", "list", "-H", "-o", "name", dataset],
                                        check=True, capture_output=True, timeout=120))


def zfs_endpoints(target: Target, count: int, repeat: int) -> dict[str, str]:
    """As :func:`latency_rows`, each endpoint on its own: one that fails (zfs-fuse answers
    "busy" near 1,000 mounted datasets) says so in its cell, the others are still measured."""
    present = {v["Name"] for v in target.call("VolumeDriver.List", {})["Volumes"]}
    probe, index = "fill00000", 0
    while len(present) < count or probe not in present:
        name = f"fill{index:05d}"
        if name not in present:
            target.populate(name)
            present.add(name)
        index += 1
    for _ in range(20):
        target.call("VolumeDriver.Get", {"Name": probe})
    rows: dict[str, str] = {}

    def measure(endpoint: str, calls: list[tuple[str, dict]]) -> None:
        try:
            rows[endpoint] = summary([timed(lambda c=c: target.call(*c)) for c in calls])
        except (RuntimeError, OSError, http.client.HTTPException) as exc:
            rows[endpoint] = "failed: " + str(exc)[-120:].replace("|", "/")
    measure("Get", [("VolumeDriver.Get", {"Name": probe})] * repeat)
    measure("Path", [("VolumeDriver.Path", {"Name": probe})] * repeat)
    ids = [secrets.token_hex(32) for _ in range(repeat)]
    measure("Mount", [("VolumeDriver.Mount", {"Name": probe, "ID": i}) for i in ids])
    measure("Unmount", [("VolumeDriver.Unmount", {"Name": probe, "ID": i}) for i in ids])
    measure("List", [("VolumeDriver.List", {})] * max(5, repeat // 10))
    names = [f"bench{secrets.token_hex(4)}" for _ in range(max(5, repeat // 5))]
    measure("Create", [("VolumeDriver.Create", {"Name": n, "Opts": {}}) for n in names])
    measure("Remove", [("VolumeDriver.Remove", {"Name": n}) for n in names])
    return rows


def zfs_rows(base: Path, sizes: list[int], repeat: int) -> list[str]:
    """snapvol-zfs per endpoint at each of *sizes* volumes, median / p95, next to one raw
    ``zfs list`` process measured in the same run, and the ratio of medians. Remove
    destroys (trash off): the trash's rename is not what is measured. A count the pool
    cannot reach ends the table there, and says so; an endpoint that fails says so in its
    cell (zfs-fuse answers "busy" near 1,000 mounted datasets)."""
    endpoints = ["Get", "Path", "Mount", "Unmount", "List", "Create", "Remove"]
    rows = ["| volumes | raw `zfs list` | " + " | ".join(endpoints) + " |",
            "|" + "---|" * (2 + len(endpoints))]
    base = base / "zfs-section"
    (base / "run").mkdir(parents=True)
    try:
        with zfs_plugin(base, {"SNAPVOL_TRASH_TTL": "0"}) as zfs:
            for n in sizes:
                print(f"bench: zfs section at {n} volumes...", file=sys.stderr)
                try:
                    measured = zfs_endpoints(zfs, n, repeat)
                except (RuntimeError, OSError, subprocess.SubprocessError, http.client.HTTPException) as exc:
                    rows.append(f"| {n} | not reached: {str(exc)[:200]} |")
                    print(rows[-1], file=sys.stderr)
                    break
                raw = [raw_zfs_ms(f"{zfs.zfs_root}/fill00000") for _ in range(max(5, repeat // 10))]
                raw_median = statistics.median(raw)
                cells = [f"{measured[ep]} ({float(measured[ep].split()[0]) / raw_median:.2f}x)"
                         if not measured[ep].startswith("failed") else measured[ep] for ep in endpoints]
                rows.append(f"| {n} | {summary(raw)} | " + " | ".join(cells) + " |")
                print(rows[-1], file=sys.stderr)           # kept if a larger count fails
    except AssertionError as exc:    # the pool would not go (zfs-fuse: "busy" after 1,000)
        print(f"bench: zfs section cleanup: {exc}; destroy that pool by hand", file=sys.stderr)
    return ["snapvol-zfs latency over the raw socket, ms, median / p95 (ratio of the medians "
            "to one raw `zfs list -H -o name` process):\n", *rows, ""]


def fill(directory: str, size: int) -> None:
    """*size* bytes of incompressible data in 64 MiB files, flushed to disk."""
    chunk = 64 << 20
    with open("/dev/urandom", "rb") as rnd:
        block = rnd.read(min(size, chunk))
    for index in range(max(1, size // chunk)):
        with open(f"{directory}/data{index:04d}", "wb") as f:
            f.write(block[: min(size - index * chunk, chunk)] if size < chunk else block)
            # distinct content per file, so no filesystem could share or skip it
            f.write(index.to_bytes(8, "big"))
    subprocess.run(["sync", "-f", directory], check=True, timeout=600)


def snapshot_rows(snapvol: Target, zfs: Target | None, bv: Target, base: Path,
                  sizes_mb: list[int], zfs_max_mb: int, repeat: int) -> list[str]:
    """Snapshot time against data size: snapvol (btrfs, zfs), buttervolume's snapshot, and
    a tar backup of the same data (what a container-job backup does)."""
    rows = ["| data | snapvol snapshot | snapvol-zfs snapshot | buttervolume snapshot | tar of the volume |",
            "|---|---|---|---|---|"]
    for mb in sizes_mb:
        size = mb << 20
        cells = []
        for target in (snapvol, zfs, bv):
            if target is None or (target is zfs and mb > zfs_max_mb):
                cells.append("-")
                continue
            name = f"snap{secrets.token_hex(3)}"
            target.call("VolumeDriver.Create", {"Name": name})
            path = target.call("VolumeDriver.Mount", {"Name": name, "ID": "bench"})["Mountpoint"]
            print(f"bench: {target.label}: writing {mb} MiB...", file=sys.stderr)
            fill(path, size)
            samples = []
            for i in range(repeat):
                if target is bv:   # buttervolume's own endpoint: a read-only btrfs snapshot
                    samples.append(timed(lambda: target.call("VolumeDriver.Snapshot", {"Name": name})))
                else:
                    samples.append(timed(lambda: target.call(
                        "Snapvol.SnapshotCreate", {"Volumes": [name], "Name": f"s{i}"})))
            cells.append(summary(samples))
            if target is snapvol:
                archive = base / "backup.tar"
                tar = [timed(lambda: subprocess.run(["tar", "-cf", str(archive), "-C", path, "."],
                                                    check=True, timeout=3600))
                       for _ in range(min(repeat, 3))]
                archive.unlink()
                tar_cell = summary(tar)
            target.call("VolumeDriver.Unmount", {"Name": name, "ID": "bench"})
            if target is not bv:   # buttervolume keeps its snapshots; its pool goes anyway
                for i in range(repeat):
                    target.call("Snapvol.SnapshotRemove", {"Volume": name, "Snapshot": f"s{i}"})
                target.call("VolumeDriver.Remove", {"Name": name})
        rows.append(f"| {mb} MiB | " + " | ".join(cells) + f" | {tar_cell} |")
    return rows


def cli(socket: str, *argv: str, stdin=None, stdout=None) -> subprocess.Popen:
    return subprocess.Popen([str(REPO / ".venv" / "bin" / "snapvol"), "--socket", socket, *argv],
                            stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)


def pipe_time(first: list[str] | subprocess.Popen, second_argv: list[str],
              then: list[str] | None = None) -> float:
    """Seconds for ``first | second`` and then *then* (argv lists; no shell)."""
    started = time.perf_counter()
    left = first if isinstance(first, subprocess.Popen) else subprocess.Popen(first, stdout=subprocess.PIPE)
    right = subprocess.Popen(second_argv, stdin=left.stdout, stdout=subprocess.DEVNULL)
    left.stdout.close()
    if right.wait() != 0 or left.wait() != 0:
        raise RuntimeError(f"pipe failed: {getattr(left, 'args', first)} | {second_argv}")
    if then:
        subprocess.run(then, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def settle(kind: str, pools: list[str]) -> None:
    """Let the filesystems finish what earlier runs left them before the next timed run:
    Btrfs cleans a deleted subvolume's extents in the background (`btrfs subvolume sync`
    waits for that) and writes dirty pages back later. Without this the raw pipe's deletion
    was billed to whichever run came next."""
    for pool in pools:
        if kind == "btrfs":
            subprocess.run(["btrfs", "subvolume", "sync", pool], check=True, timeout=600,
                           stdout=subprocess.DEVNULL)
            subprocess.run(["btrfs", "filesystem", "sync", pool], check=True, timeout=600)
    subprocess.run(["sync"], check=True, timeout=600)


def replication_rows(source: Target, replica: PluginProcess, size_mb: int, changed_mb: int,
                     base: Path, kind: str, rounds: int = 3) -> list[str]:
    """Full send+receive through snapvol against the raw native pipe on the same snapshot,
    an incremental stream against the bytes changed, and tar+gzip of the same volume.

    The three full transfers take turns, *rounds* times, each on settled filesystems: a
    2-core machine's background work (writeback, another tenant) moves single runs by more
    than the difference being measured, and taking turns puts that on all three alike. The
    rows give the medians, their ratio, and each round's ratio."""
    name = f"repl{secrets.token_hex(3)}"
    source.call("VolumeDriver.Create", {"Name": name})
    path = source.call("VolumeDriver.Mount", {"Name": name, "ID": "bench"})["Mountpoint"]
    print(f"bench: {source.label}: writing {size_mb} MiB for replication...", file=sys.stderr)
    fill(path, size_mb << 20)
    source.call("Snapvol.SnapshotCreate", {"Volumes": [name], "Name": "s1"})
    size = size_mb << 20
    snvol = str(REPO / ".venv" / "bin" / "snapvol")
    pools = [str(Path(path).parent.parent), str(replica.state_dir / "pool")]

    def raw_pipe() -> float:
        """The native pipe, on the same snapshot, into the replica's storage."""
        if kind == "btrfs":
            snap = Path(path).parent.parent / "snapshots" / name / "s1"
            scratch = replica.state_dir / "pool" / "bench-raw"
            scratch.mkdir()
            # ...then committed, as snapvol's receive is when it makes the volume (a snapshot
            # commits the transaction): both columns end with the data on disk
            took = pipe_time(["btrfs", "send", "-q", str(snap)], ["btrfs", "receive", "-q", str(scratch)],
                             ["btrfs", "filesystem", "sync", str(scratch)])
            btrfsutil.set_subvolume_read_only(str(scratch / "s1"), False)
            btrfsutil.delete_subvolume(str(scratch / "s1"))
            scratch.rmdir()
            return took
        dataset = f"{source.zfs_root}/{name}@s1"
        target = f"{replica.env['SNAPVOL_ZFS_ROOT']}/benchraw"
        # ...then one property set (a transaction group sync), as snapvol's receive does
        took = pipe_time(["zfs", "send", dataset], ["zfs", "receive", "-u", target],
                         ["zfs", "set", "canmount=noauto", target])
        subprocess.run(["zfs", "destroy", "-r", target], check=True)
        return took

    def drop(volume: str) -> None:
        """*volume* gone from the replica for good (not kept in its trash)."""
        for endpoint, body in (("VolumeDriver.Remove", {"Name": volume}),
                               ("Snapvol.TrashPurge", {"Volume": volume})):
            status, reply = replica.call(endpoint, body)
            if status != 200:
                raise RuntimeError(f"{endpoint} {volume}: {reply}")

    def through_cli() -> float:
        """`snapvol send | snapvol receive`: the CLI relays between the two plugins."""
        sender = cli(source.socket, "send", f"{name}@s1", stdout=subprocess.PIPE)
        took = pipe_time(sender, [snvol, "--socket", str(replica.socket), "receive", f"{name}c"])
        drop(f"{name}c")
        return took

    def replicate() -> float:
        """Plugin to plugin: `snapvol replicate` to the second instance's socket (no CLI in
        the data's path)."""
        started = time.perf_counter()
        proc = cli(source.socket, "replicate", name, f"unix://{replica.socket}", "--as", f"{name}r",
                   "--snapshot", "s1", stdout=subprocess.DEVNULL)
        if proc.wait() != 0:
            raise RuntimeError(proc.stderr.read().decode())
        took = time.perf_counter() - started
        drop(f"{name}r")
        return took

    runs: dict[str, list[float]] = {"raw": [], "cli": [], "replicate": []}
    for round_ in range(rounds):
        print(f"bench: {source.label}: transfers, round {round_ + 1} of {rounds}...", file=sys.stderr)
        for key, run in (("raw", raw_pipe), ("cli", through_cli), ("replicate", replicate)):
            settle(kind, pools)
            runs[key].append(run())
    raw, ours, direct = (statistics.median(runs[k]) for k in ("raw", "cli", "replicate"))

    def each(key: str) -> str:
        ratios = [r / o * 100 for r, o in zip(runs["raw"], runs[key])]
        return f"rounds: {', '.join(f'{x:.0f}' for x in ratios)} %"
    # incremental: a new file of changed_mb
    with open(f"{path}/changed", "wb") as f:
        f.write(os.urandom(changed_mb << 20))
    subprocess.run(["sync", "-f", path], check=True)
    source.call("Snapvol.SnapshotCreate", {"Volumes": [name], "Name": "s2"})
    inc_file = base / "inc.stream"
    proc = cli(source.socket, "send", f"{name}@s2", "--since", "s1", "-o", str(inc_file))
    if proc.wait() != 0:
        raise RuntimeError(proc.stderr.read().decode())
    inc = inc_file.stat().st_size
    inc_file.unlink()
    archive = base / "backup.tgz"
    started = time.perf_counter()
    subprocess.run(["tar", "-czf", str(archive), "-C", path, "."], check=True)
    tgz = time.perf_counter() - started
    tgz_size = archive.stat().st_size
    archive.unlink()
    source.call("VolumeDriver.Unmount", {"Name": name, "ID": "bench"})
    for snap in source.call("Snapvol.SnapshotList", {"Volume": name})["Snapshots"]:
        source.call("Snapvol.SnapshotRemove", {"Volume": name, "Snapshot": snap["name"]})
    source.call("VolumeDriver.Remove", {"Name": name})
    mib = size / (1 << 20)
    return [f"| {source.label}: full `snapvol send \\| snapvol receive` of {size_mb} MiB, median of "
            f"{rounds} | {mib / ours:.0f} MiB/s ({ours:.2f} s) | raw `{kind} send \\| {kind} receive`: "
            f"{mib / raw:.0f} MiB/s ({raw:.2f} s) | {raw / ours * 100:.0f} % ({each('cli')}) |",
            f"| {source.label}: `snapvol replicate` of the same snapshot to a second instance | "
            f"{mib / direct:.0f} MiB/s ({direct:.2f} s) | raw pipe as above | "
            f"{raw / direct * 100:.0f} % ({each('replicate')}) |",
            f"| {source.label}: incremental stream after writing {changed_mb} MiB | "
            f"{inc / (1 << 20):.1f} MiB | changed: {changed_mb} MiB | {inc / (changed_mb << 20):.2f}x |",
            f"| {source.label}: `tar -cz` of the same volume | {mib / tgz:.0f} MiB/s ({tgz:.2f} s) | "
            f"archive {tgz_size / (1 << 20):.0f} MiB | snapvol full is {tgz / ours:.1f}x faster |"]


def fill_compressible(directory: str, size: int) -> None:
    """*size* bytes of text that compresses about as a database dump does (zstd -3: ~4x):
    numbered rows with a few random fields, in 64 MiB files, flushed to disk."""
    import random
    rnd = random.Random(17)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    written, index = 0, 0
    while written < size:
        rows = []
        for _ in range(200_000):
            rows.append(f"{written + len(rows):012d},{rnd.choice(words)},{rnd.randrange(10**6)},"
                        f"{rnd.choice(words)}-{rnd.randrange(1000):03d},2026-12-04T{rnd.randrange(24):02d}:00\n")
        block = "".join(rows).encode()[: min(64 << 20, size - written)]
        with open(f"{directory}/rows{index:04d}.csv", "wb") as f:
            f.write(block)
        written += len(block)
        index += 1
    subprocess.run(["sync", "-f", directory], check=True, timeout=600)


def throttled(source, sink, rate: float) -> threading.Thread:
    """Copy *source* to *sink* at most *rate* bytes a second (a slow link), in a thread; both
    are closed at the end."""
    def copy() -> None:
        started, sent = time.perf_counter(), 0
        try:
            while block := source.read1(256 << 10):
                sink.write(block)
                sent += len(block)
                ahead = sent / rate - (time.perf_counter() - started)
                if ahead > 0:
                    time.sleep(ahead)
        finally:
            sink.close()
            source.close()
    thread = threading.Thread(target=copy, name="bench-link", daemon=True)
    thread.start()
    return thread


def compression_rows(source: Target, replica: PluginProcess, size_mb: int, rate_mb: float,
                     base: Path) -> list[str]:
    """`snapvol send | (a link of rate_mb MB/s) | snapvol receive` of compressible data, with
    and without ``--compress zstd``."""
    name = f"zst{secrets.token_hex(3)}"
    source.call("VolumeDriver.Create", {"Name": name})
    path = source.call("VolumeDriver.Mount", {"Name": name, "ID": "bench"})["Mountpoint"]
    print(f"bench: {source.label}: writing {size_mb} MiB of compressible rows...", file=sys.stderr)
    fill_compressible(path, size_mb << 20)
    source.call("Snapvol.SnapshotCreate", {"Volumes": [name], "Name": "s1"})
    results = {}
    for label, extra in (("plain", []), ("zstd", ["--compress", "zstd"])):
        copy = f"{name}{label}"
        started = time.perf_counter()
        sender = cli(source.socket, "send", f"{name}@s1", *extra, stdout=subprocess.PIPE)
        receiver = subprocess.Popen([str(REPO / ".venv" / "bin" / "snapvol"), "--socket",
                                     str(replica.socket), "receive", copy],
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
        link = throttled(sender.stdout, receiver.stdin, rate_mb * 1e6)
        link.join(timeout=3600)
        if receiver.wait(timeout=600) != 0 or sender.wait(timeout=600) != 0:
            raise RuntimeError(f"throttled {label}: {receiver.stderr.read()} {sender.stderr.read()}")
        results[label] = time.perf_counter() - started
        replica.call("VolumeDriver.Remove", {"Name": copy})
    source.call("VolumeDriver.Unmount", {"Name": name, "ID": "bench"})
    source.call("Snapvol.SnapshotRemove", {"Volume": name, "Snapshot": "s1"})
    source.call("VolumeDriver.Remove", {"Name": name})
    plain, packed = results["plain"], results["zstd"]
    return [f"| {source.label}: full send + receive of {size_mb} MiB of compressible rows over a "
            f"{rate_mb:.0f} MB/s link, `--compress zstd` | {packed:.2f} s | uncompressed: "
            f"{plain:.2f} s | {plain / packed:.1f}x faster |"]


def write_records(path: Path, stop: threading.Event, every: float = 0.1) -> list[tuple[int, float]]:
    """Append one fsync'd record per *every* seconds to ``path/records`` until *stop*: a
    database's committed transactions. Returns (record, wall time acknowledged)."""
    acked = []
    fd = os.open(path / "records", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        n = 0
        while not stop.is_set():
            n += 1
            os.write(fd, f"{n}\n".encode())
            os.fsync(fd)
            acked.append((n, time.time()))
            stop.wait(every)
    except OSError:
        pass                        # the host died under us
    finally:
        os.close(fd)
    return acked


def standby_rows(base: Path, size_mb: int, changed_mb: int, sync_s: int) -> list[str]:
    """Two snapvol instances (Btrfs, own pools): a planned hand-off of a volume against moving
    the same volume by a full copy (what a host without standbys must do), and the failover
    RPO: a writer appends fsync'd records, the primary is SIGKILLed, the standby promoted."""
    env = {"SNAPVOL_POOL_SIZE": "6G", "SNAPVOL_LOG_LEVEL": "warning"}
    a = PluginProcess(f"snapvolbencha{secrets.token_hex(3)}", base / "ha-a",
                      {**env, "SNAPVOL_RUN_DIR": str(base / "run" / "ha-a")})
    b = PluginProcess(f"snapvolbenchb{secrets.token_hex(3)}", base / "ha-b",
                      {**env, "SNAPVOL_RUN_DIR": str(base / "run" / "ha-b")})
    rows = ["| measure | snapvol standby | alternative | ratio |", "|---|---|---|---|"]
    try:
        a.start()
        b.start()
        ca, cb = PluginClient(str(a.socket), timeout=600), PluginClient(str(b.socket), timeout=600)

        def call(client: PluginClient, endpoint: str, body: dict) -> dict:
            status, reply = client.call(endpoint, body)
            if status != 200:
                raise RuntimeError(f"{endpoint}: {reply}")
            return reply

        # 1. hand-off against a full copy
        vol = f"ha{secrets.token_hex(3)}"
        call(ca, "VolumeDriver.Create", {"Name": vol, "Opts": {"standby": f"unix://{b.socket}",
                                                               "sync": "1h"}})
        path = call(ca, "VolumeDriver.Mount", {"Name": vol, "ID": "bench"})["Mountpoint"]
        print(f"bench: standby: writing {size_mb} MiB...", file=sys.stderr)
        fill(path, size_mb << 20)
        call(ca, "VolumeDriver.Unmount", {"Name": vol, "ID": "bench"})
        started = time.perf_counter()
        call(ca, "Snapvol.Sync", {"Volume": vol})
        seed = time.perf_counter() - started
        path = call(ca, "VolumeDriver.Mount", {"Name": vol, "ID": "bench"})["Mountpoint"]
        with open(f"{path}/changed", "wb") as f:
            f.write(os.urandom(changed_mb << 20))
        subprocess.run(["sync", "-f", path], check=True, timeout=600)
        call(ca, "VolumeDriver.Unmount", {"Name": vol, "ID": "bench"})
        started = time.perf_counter()
        handoff = call(ca, "Snapvol.Handoff", {"Volume": vol, "Target": f"unix://{b.socket}"})["Handoff"]
        moved = time.perf_counter() - started
        # the alternative: the same volume, now on b, copied whole back to a (no standby)
        started = time.perf_counter()
        proc = cli(str(b.socket), "replicate", vol, f"unix://{a.socket}", "--as", f"{vol}copy",
                   stdout=subprocess.DEVNULL)
        if proc.wait() != 0:
            raise RuntimeError(proc.stderr.read().decode())
        full = time.perf_counter() - started
        rows.append(f"| planned hand-off of a {size_mb} MiB volume, {changed_mb} MiB written since "
                    f"the last sync (fence, final delta, standby made primary) | {moved:.2f} s "
                    f"({handoff['bytes'] / (1 << 20):.1f} MiB sent) | the volume copied whole to the "
                    f"other host (`snapvol replicate`, full): {full:.2f} s | {full / moved:.0f}x faster |")
        rows.append(f"| the standby's first sync (the seed, once) | {seed:.2f} s | - | - |")
        # 2. failover RPO: a writer, syncs every sync_s, kill -9 of the primary, promote
        vol2 = f"rpo{secrets.token_hex(3)}"
        call(ca, "VolumeDriver.Create", {"Name": vol2, "Opts": {"standby": f"unix://{b.socket}",
                                                                "sync": f"{sync_s}s"}})
        path = Path(call(ca, "VolumeDriver.Mount", {"Name": vol2, "ID": "bench"})["Mountpoint"])
        stop = threading.Event()
        acked: list[tuple[int, float]] = []
        writer = threading.Thread(target=lambda: acked.extend(write_records(path, stop)))
        writer.start()
        time.sleep(sync_s * 3 + secrets.randbelow(sync_s * 1000) / 1000)
        os.killpg(a.pid, signal.SIGKILL)              # the primary host is lost
        killed = time.time()
        stop.set()
        writer.join(30)
        a._proc.wait(30)
        promoted = call(cb, "Snapvol.Promote", {"Volume": vol2})["Promoted"]
        there = Path(call(cb, "VolumeDriver.Mount", {"Name": vol2, "ID": "bench"})["Mountpoint"])
        kept = set((there / "records").read_text().split())
        call(cb, "VolumeDriver.Unmount", {"Name": vol2, "ID": "bench"})
        lost = [n for n, _ in acked if str(n) not in kept]
        lost_seconds = killed - min((at for n, at in acked if n in lost), default=killed)
        rows.append(f"| failover: primary SIGKILLed, `snapvol promote` on the standby (`sync={sync_s}s`, "
                    f"a writer appending 10 fsync'd records a second) | lost {len(lost)} of "
                    f"{len(acked)} records: the last {lost_seconds:.1f} s (snapshot served: "
                    f"{promoted.get('age_seconds')} s old) | bound: the sync interval, {sync_s} s | - |")
        a.start()                                     # (it stands down: its copy set aside)
    finally:
        a.stop()
        b.stop()
    return rows


def swarm_rows(base: Path, size_mb: int) -> list[str]:
    """Two Docker nodes in a Swarm (tests/e2e/nodes.py): a service on a volume with a standby,
    drained from node a, against the same service on a volume without one."""
    from tests.e2e.nodes import TwoNodes
    nodes = TwoNodes(base / "swarm", manager="b")
    rows = ["| measure | snapvol standby | alternative | |", "|---|---|---|---|"]
    try:
        nodes.up()
        for node in nodes:
            busybox = node.docker.import_busybox()
        results = {}
        for label, opts in (("standby", f",volume-opt=standby={nodes.b.advertise},volume-opt=sync=5s"),
                            ("plain", "")):
            nodes.manager.docker("node", "update", "--availability", "drain", "node-b")
            nodes.manager.docker("node", "update", "--availability", "active", "node-a")
            service, vol = f"bench{label}{secrets.token_hex(2)}", f"bench{label}{secrets.token_hex(2)}"
            nodes.manager.docker(
                "service", "create", "--detach", "--no-resolve-image", "--name", service,
                "--endpoint-mode", "dnsrr", "--stop-grace-period", "2s",
                "--mount", f"type=volume,source={vol},target=/data,volume-driver=snapvol{opts}",
                busybox, "sh", "-c", "touch /tmp/ready; md5sum /data/blob > /tmp/sum 2>/dev/null "
                "|| echo none > /tmp/sum; touch /tmp/summed; sleep 3600")
            first = _task_container(nodes, service, nodes.a)
            _wait_file(nodes.a, first, "/tmp/summed")
            nodes.a.docker("exec", first, "sh", "-c", f"dd if=/dev/urandom of=/data/blob bs=1M "
                           f"count={size_mb} 2>/dev/null && sync", timeout=600)
            checksum = nodes.a.docker("exec", first, "md5sum", "/data/blob").split()[0]
            if label == "standby":
                time.sleep(12)                         # the standby synced at least once
            nodes.manager.docker("node", "update", "--availability", "active", "node-b")
            started = time.perf_counter()
            nodes.manager.docker("node", "update", "--availability", "drain", "node-a")
            second = _task_container(nodes, service, nodes.b)
            _wait_file(nodes.b, second, "/tmp/ready")
            seconds = time.perf_counter() - started
            _wait_file(nodes.b, second, "/tmp/summed")
            there = nodes.b.docker("exec", second, "cat", "/tmp/sum").split()[0]
            results[label] = (seconds, there == checksum)
            nodes.manager.docker("service", "rm", service)
        s, p = results["standby"], results["plain"]
        rows.append(f"| `docker node update --availability drain` of the node running a service "
                    f"with {size_mb} MiB on its volume -> the task running on the other node | "
                    f"{s[0]:.1f} s, data {'there' if s[1] else 'MISSING'} | a snapvol volume without "
                    f"standby: {p[0]:.1f} s, data {'there' if p[1] else 'not there (a new, empty volume)'} | |")
    finally:
        nodes.down()
    return rows


def _task_container(nodes, service: str, on, timeout: float = 180) -> str:
    """The running container of *service*'s task on node *on*."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids = on.docker("ps", "-q", "--filter", f"label=com.docker.swarm.service.name={service}").split()
        if ids:
            return ids[0]
        time.sleep(0.1)
    raise RuntimeError(f"{service} not running on {on.hostname}: "
                       + nodes.manager.docker("service", "ps", "--no-trunc", service, check=False))


def _wait_file(node, container: str, path: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while node.docker.result("exec", container, "test", "-e", path).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} never appeared in {container} on {node.hostname}")
        time.sleep(0.1)


def latency_while_hanging(source: Target, base: Path, repeat: int) -> list[str]:
    """Get and List on the plugin, idle and while four replications hang on a target that
    accepts connections and never reads (the issue's "transfers never block Docker")."""
    import socket
    name = f"hang{secrets.token_hex(3)}"
    source.call("VolumeDriver.Create", {"Name": name})
    path = source.call("VolumeDriver.Mount", {"Name": name, "ID": "bench"})["Mountpoint"]
    fill(path, 32 << 20)
    dead_path = base / "dead.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(dead_path))
    dead.listen(16)
    held = []

    def measure() -> tuple[str, str]:
        get = summary([timed(lambda: source.call("VolumeDriver.Get", {"Name": name})) for _ in range(repeat)])
        lst = summary([timed(lambda: source.call("VolumeDriver.List", {})) for _ in range(repeat // 4)])
        return get, lst

    idle = measure()
    workers = [cli(source.socket, "replicate", name, f"unix://{dead_path}") for _ in range(4)]
    dead.settimeout(30)
    while len(held) < 4:
        held.append(dead.accept()[0])
    time.sleep(1)
    hanging = measure()
    dead.close()
    for conn in held:
        conn.close()
    dead_path.unlink()
    for worker in workers:
        worker.wait(120)
        worker.stderr.close()
    source.call("VolumeDriver.Unmount", {"Name": name, "ID": "bench"})
    for snap in source.call("Snapvol.SnapshotList", {"Volume": name})["Snapshots"]:
        source.call("Snapvol.SnapshotRemove", {"Volume": name, "Snapshot": snap["name"]})
    source.call("VolumeDriver.Remove", {"Name": name})
    return [f"| {source.label}: Get, ms (median / p95) | {hanging[0]} | idle: {idle[0]} | |",
            f"| {source.label}: List, ms (median / p95) | {hanging[1]} | idle: {idle[1]} | |"]


def start_seconds(process: PluginProcess, timeout: float = 300) -> float:
    """Start *process* and time it until its socket answers a Docker call: gunicorn's
    master, the worker's imports, ``create_app`` (storage check, recovery, trash, mount
    table, schedules) and the first answer, polled every 10 ms."""
    process.socket.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with process.log.open("ab") as log:
        process._proc = subprocess.Popen(
            [sys.executable, "-m", "plugin.serve", "-c", "python:plugin.gunicorn_conf"],
            cwd=REPO, env=process.env, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            start_new_session=True)
    while time.perf_counter() - started < timeout:
        if process._proc.poll() is not None:
            raise RuntimeError(f"plugin exited: {process.log_tail()}")
        try:
            conn = UnixHTTPConnection(str(process.socket), timeout=timeout)
            conn.request("POST", "/VolumeDriver.Capabilities", body=b"{}")
            if conn.getresponse().status == 200:
                conn.close()
                return time.perf_counter() - started
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.01)
    raise RuntimeError(f"plugin did not answer in {timeout} s: {process.log_tail()}")


def stop_keeping_mounts(process: PluginProcess) -> None:
    """Stop the plugin as a host's service manager does, its mount table left in place
    (PluginProcess.stop removes the run directory, which holds it)."""
    assert process._proc is not None
    process._proc.terminate()
    process._proc.wait(60)
    process._proc = None


def scale_rows(base: Path, counts: list[int], repeat: int) -> list[str]:
    """Plugin start (10 % of the volumes mounted, as running containers keep them) and
    memory at each of *counts* volumes, then memory once they are removed (in the trash,
    then purged). Volumes are made by the plugin's own Create over one connection, and
    measured after a restart, so every figure is the plugin's real work."""
    run_dir = base / "run" / "scale"
    process = PluginProcess(f"snapvolbenchs{secrets.token_hex(3)}", base / "sstate",
                            {"SNAPVOL_POOL_SIZE": "16G", "SNAPVOL_LOG_LEVEL": "warning",
                             "SNAPVOL_RUN_DIR": str(run_dir)}, socket_dir=base / "ssock")
    rows = ["| volumes (10 % mounted) | start, s (median of 3) | RSS / PSS, MiB, idle | "
            "Create, ms (median / p95) | Get / Mount, ms (median) |", "|---|---|---|---|---|"]
    memory: list[tuple[int, float, float]] = []
    made = 0
    try:
        start_seconds(process)
        for count in counts:
            target = Target("scale", process.socket, lambda name: None,
                            lambda: [process.pid, *descendants(process.pid)])
            print(f"bench: scale: filling to {count} volumes...", file=sys.stderr)
            create_ms = []
            while made < count:
                name = f"s{made:05d}"
                create_ms.append(timed(lambda: target.call("VolumeDriver.Create", {"Name": name})))
                if made % 10 == 0:
                    target.call("VolumeDriver.Mount", {"Name": name, "ID": f"scale{made}"})
                made += 1
            stop_keeping_mounts(process)
            starts = []
            for _ in range(3):
                starts.append(start_seconds(process))
                stop_keeping_mounts(process)
            start_seconds(process)
            time.sleep(IDLE_AFTER)
            rss, pss = memory_mib(target.pids())
            memory.append((count, rss, pss))
            get = statistics.median(timed(lambda: target.call("VolumeDriver.Get", {"Name": "s00001"}))
                                    for _ in range(repeat))
            mounts = []
            for i in range(repeat):
                mounts.append(timed(lambda: target.call("VolumeDriver.Mount", {"Name": "s00001", "ID": f"m{i}"})))
                target.call("VolumeDriver.Unmount", {"Name": "s00001", "ID": f"m{i}"})
            print(f"bench: scale: {count} volumes: starts {starts}, memory {rss:.1f} / {pss:.1f}",
                  file=sys.stderr)
            rows.append(f"| {count:,} | {statistics.median(starts):.2f} (of {', '.join(f'{x:.2f}' for x in starts)}) "
                        f"| {rss:.1f} / {pss:.1f} | {summary(create_ms[-1000:]) if create_ms else '-'} "
                        f"| {get:.2f} / {statistics.median(mounts):.2f} |")
            target._conn = None
        rows += ["", "| memory | RSS, MiB | PSS, MiB |", "|---|---|---|"]
        (first, rss0, pss0), (last, rss1, pss1) = memory[0], memory[-1]
        per = 1000 / max(1, last - first)
        rows.append(f"| at {first:,} volumes | {rss0:.1f} | {pss0:.1f} |")
        rows.append(f"| at {last:,} volumes | {rss1:.1f} | {pss1:.1f} |")
        rows.append(f"| growth per 1,000 volumes ({first:,} -> {last:,}) | {(rss1 - rss0) * per:+.2f} "
                    f"| {(pss1 - pss0) * per:+.2f} |")
        target = Target("scale", process.socket, lambda name: None,
                        lambda: [process.pid, *descendants(process.pid)])

        def replaced(before: list[int]) -> tuple[float, tuple[float, float]]:
            """Wait for the plugin to replace its worker (plugin.recycle: idle for
            SNAPVOL_RECYCLE_QUIET, 60 s, after the drop); the seconds that took, and the
            memory then (nan if it did not within 3 minutes)."""
            waited = time.monotonic()
            while descendants(process.pid) == before and time.monotonic() - waited < 180:
                time.sleep(1)
            if descendants(process.pid) == before:
                return float("nan"), (float("nan"), float("nan"))
            seconds = time.monotonic() - waited
            time.sleep(IDLE_AFTER)
            return seconds, memory_mib(target.pids())

        def remove_and_purge(mounted: bool) -> tuple[list[float], list[float], tuple[float, float],
                                                     tuple[float, float]]:
            """Remove every volume (into the trash), then purge them one by one (a purge of
            everything in one call outlasts any client timeout); the times of each, and the
            memory after each (the purge's measured before the worker is replaced)."""
            print(f"bench: scale: removing {made} volumes...", file=sys.stderr)
            removing = []
            for index in range(made):
                name = f"s{index:05d}"
                if mounted and index % 10 == 0:
                    target.call("VolumeDriver.Unmount", {"Name": name, "ID": f"scale{index}"})
                removing.append(timed(lambda: target.call("VolumeDriver.Remove", {"Name": name})))
            time.sleep(IDLE_AFTER)
            removed = memory_mib(target.pids())
            print("bench: scale: purging the trash...", file=sys.stderr)
            purging = [timed(lambda n=f"s{index:05d}": target.call("Snapvol.TrashPurge", {"Volume": n}))
                       for index in range(made)]
            time.sleep(IDLE_AFTER)
            return removing, purging, removed, memory_mib(target.pids())

        worker = descendants(process.pid)
        removing, purging, (rss, pss), purged = remove_and_purge(mounted=True)
        after, fresh = replaced(worker)
        rows.append(f"| after removing them (kept in the trash) | {rss:.1f} | {pss:.1f} |")
        rows.append(f"| after purging the trash, {IDLE_AFTER:.0f} s later | {purged[0]:.1f} | {purged[1]:.1f} |")
        rows.append(f"| once the worker replaced itself ({after + IDLE_AFTER:.0f} s after the purge) "
                    f"| {fresh[0]:.1f} | {fresh[1]:.1f} |")
        # a second round in the same process: is what stays a high-water mark that the next
        # volumes reuse, or does each round add to it?
        worker = descendants(process.pid)
        print(f"bench: scale: making {made} volumes again...", file=sys.stderr)
        for index in range(made):
            target.call("VolumeDriver.Create", {"Name": f"s{index:05d}"})
        time.sleep(IDLE_AFTER)
        again = memory_mib(target.pids())
        *_, purged_again = remove_and_purge(mounted=False)
        after_again, fresh_again = replaced(worker)
        rows.append(f"| {made:,} made again, in the new worker | {again[0]:.1f} | {again[1]:.1f} |")
        rows.append(f"| ...removed and purged again, {IDLE_AFTER:.0f} s later | {purged_again[0]:.1f} "
                    f"| {purged_again[1]:.1f} |")
        rows.append(f"| once the worker replaced itself again ({after_again + IDLE_AFTER:.0f} s after) "
                    f"| {fresh_again[0]:.1f} | {fresh_again[1]:.1f} |")
        # what a new process holds with no volumes: the lever that gives it all back
        stop_keeping_mounts(process)
        start_seconds(process)
        target._conn = None
        time.sleep(IDLE_AFTER)
        restarted = memory_mib(target.pids())
        rows.append(f"| after a restart of the plugin | {restarted[0]:.1f} | {restarted[1]:.1f} |")
        tenth = max(1, made // 10)
        rows += ["", f"Remove, ms (median / p95): first tenth {summary(removing[:tenth])}; last tenth "
                 f"{summary(removing[-tenth:])} (the trash holding up to {made:,} volumes); trash purge, one "
                 f"by one: first tenth {summary(purging[:tenth])}, last tenth {summary(purging[-tenth:])}"]
    finally:
        if process._proc is not None:
            stop_keeping_mounts(process)
        shutil.rmtree(run_dir, ignore_errors=True)
        for point in mounts_under(base / "sstate"):
            subprocess.run(["umount", point], check=False)
    return rows
def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class _GetSampler(threading.Thread):
    """Docker's Get over one kept-alive connection, round-robin over *names*, every *every*
    seconds until stopped: each call's latency (ms) and every failure (an ``Err`` or a
    broken connection)."""

    def __init__(self, socket: str, names: list[str], every: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.target = Target("snapvol", Path(socket), lambda name: None, lambda: [])
        self.names, self.every = names, every
        self.samples: list[float] = []
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        index = 0
        while not self.stop.wait(self.every):
            name = self.names[index % len(self.names)]
            index += 1
            started = time.perf_counter()
            try:
                self.target.call("VolumeDriver.Get", {"Name": name})
            except (RuntimeError, OSError, http.client.HTTPException, ValueError) as exc:
                self.failures.append(f"{name}: {exc}")
                continue
            self.samples.append((time.perf_counter() - started) * 1000)


class _SnapshotWatch(threading.Thread):
    """Watches the plugin from outside, whatever its implementation: when each ``auto-``
    snapshot first appears in the pool (scanned every *every* s), and each volume's recorded
    runs in the scheduler's history (``schedule.json``: ``at``, and ``due`` where the plugin
    records it), from which the run's due time follows."""

    def __init__(self, snapshots_dir: Path, history: Path, every: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.snapshots_dir, self.history, self.every = snapshots_dir, history, every
        self.seen: dict[tuple[str, str], float] = {}             # (volume, snapshot) -> time
        self.runs: dict[str, list[dict]] = {}                    # volume -> records, in order
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.scan()

    def scan(self) -> None:
        now = time.time()
        try:
            volumes = list(os.scandir(self.snapshots_dir))
        except FileNotFoundError:
            volumes = []
        for volume in volumes:
            try:
                for entry in os.scandir(volume.path):
                    if entry.name.startswith("auto-"):
                        self.seen.setdefault((volume.name, entry.name), now)
            except FileNotFoundError:
                continue
        try:
            recorded = json.loads(self.history.read_text())
        except (FileNotFoundError, ValueError):
            return
        for volume, run in recorded.items():
            runs = self.runs.setdefault(volume, [])
            if run.get("snapshot") and (not runs or runs[-1]["snapshot"] != run["snapshot"]):
                runs.append(run)

    def alive(self) -> dict[str, int]:
        """volume -> its automatic snapshots now."""
        return {v.name: sum(1 for e in os.scandir(v.path) if e.name.startswith("auto-"))
                for v in os.scandir(self.snapshots_dir)}


def scheduler_rows(base: Path, count: int, duration: float, keep: str = "last=2",
                   interval: int = 60, idle_s: float = 10.0) -> list[str]:
    """*count* volumes with ``schedule=<interval>s`` and ``keep``, on a plugin of their own
    (Btrfs, its own pool), for *duration* seconds after they exist. Measured from outside:
    each automatic snapshot's lateness (when it appeared in the pool, scanned every 0.25 s,
    minus its due time: the run's ``due`` in the scheduler's history where recorded, else
    the previous run's ``at`` plus the interval, the first one's the volume's creation plus
    the interval), snapshots taken against the slots due on the ideal grid (creation + k
    intervals, up to 5 s before the end), automatic snapshots alive per volume at the end,
    and Docker's Get (round-robin over the volumes, one call every 20 ms) idle (after the
    volumes are made, before the first is due) and during the run, with every failed call."""
    home = base / f"sched-{secrets.token_hex(3)}"
    home.mkdir()
    plugin = PluginProcess(f"snapvolbenchs{secrets.token_hex(3)}", home / "state",
                           {"SNAPVOL_POOL_SIZE": "8G", "SNAPVOL_LOG_LEVEL": "warning",
                            "SNAPVOL_RUN_DIR": str(home / "run")})
    names = [f"sched{i:05d}" for i in range(count)]
    opts = {"schedule": f"{interval}s", "keep": keep}
    try:
        plugin.start()
        maker = Target("snapvol", plugin.socket, lambda name: None, lambda: [])
        print(f"bench: scheduler: creating {count} volumes...", file=sys.stderr)
        made_from = time.time()
        for name in names:
            maker.call("VolumeDriver.Create", {"Name": name, "Opts": opts})
        made_in = time.time() - made_from
        watch = _SnapshotWatch(plugin.state_dir / "pool" / "snapshots",
                               plugin.state_dir / "schedule.json")
        watch.start()
        idle = _GetSampler(str(plugin.socket), names)
        window = made_from + interval - 1 - time.time()
        if window > 2:
            idle.start()
            time.sleep(min(idle_s, window))
            idle.stop.set()
            idle.join()
        created = {}
        for name in names:
            created[name] = btrfsutil.subvolume_info(plugin.volume_dir(name)).otime
        busy = _GetSampler(str(plugin.socket), names)
        busy.start()
        print(f"bench: scheduler: running for {duration:.0f} s...", file=sys.stderr)
        ends = time.time() + duration
        while time.time() < ends:
            time.sleep(1)
        busy.stop.set()
        busy.join()
        watch.stop.set()
        watch.join()
        watch.scan()
        alive = watch.alive()
        for _ in range(15):         # counted between two passes, not between a pass's
            time.sleep(1)           # snapshots and its prunes (then keep + 1 for a moment)
            again = watch.alive()
            if again == alive:
                break
            alive = again
        status, _ = plugin.call("Snapvol.Status")
    finally:
        plugin.stop()
        for point in mounts_under(home):
            subprocess.run(["umount", point], check=False, timeout=120)
    lateness: list[float] = []
    runs_in_history = sum(len(r) for r in watch.runs.values())
    for name in names:
        previous_at = None
        for run in watch.runs.get(name, []):
            snapshot = run["snapshot"]
            seen = watch.seen.get((name, snapshot))
            if "due" in run:
                due = datetime.fromisoformat(run["due"]).timestamp()
            elif previous_at is None:
                due = created[name] + interval
            else:
                due = previous_at + interval
            previous_at = datetime.fromisoformat(run["at"]).timestamp()
            if seen is None:
                continue                # taken and pruned between two scans: not timed
            lateness.append(max(0.0, seen - due))
    taken = sum(1 for (volume, _) in watch.seen if volume in created)
    due_slots = sum(max(0, int((ends - 5 - created[n]) // interval)) for n in names)
    bound = _keep_bound(keep, interval)
    most = max(alive.values(), default=0)
    within = sum(1 for x in lateness if x <= 5.0) / len(lateness) if lateness else 0.0

    def stats(samples: list[float]) -> str:
        if not samples:
            return "n/a (no window)"
        return (f"{statistics.median(samples):.2f} / {_percentile(samples, 0.95):.2f} / "
                f"{max(samples):.1f}")

    return [
        "| measure | value |", "|---|---|",
        f"| volumes (`schedule={interval}s`, `keep={keep}`), made in | {count}, {made_in:.0f} s |",
        "| lateness, s: p50 / p95 / p99 / max | "
        + (f"{_percentile(lateness, .5):.2f} / {_percentile(lateness, .95):.2f} / "
           f"{_percentile(lateness, .99):.2f} / {max(lateness):.2f}" if lateness else "n/a")
        + f" ({len(lateness)} timed) |",
        f"| within 5 s of the due time | {100 * within:.1f} % |",
        f"| automatic snapshots taken / due on the grid (creation + k x interval) | "
        f"{taken} / {due_slots} |",
        f"| runs recorded in the history (seen by polling) | {runs_in_history} |",
        f"| automatic snapshots alive per volume at the end, between passes: max / mean "
        f"(keep bound) | "
        f"{most} / {statistics.mean(alive.values()) if alive else 0:.2f} ({bound}) |",
        f"| Get, ms: median / p95 / max, idle ({len(idle.samples)} calls) | {stats(idle.samples)} |",
        f"| Get, ms: median / p95 / max, during the run ({len(busy.samples)} calls) | "
        f"{stats(busy.samples)} |",
        f"| failed Get calls (idle + during) | {len(idle.failures) + len(busy.failures)}"
        + (f": {(idle.failures + busy.failures)[0]}" if idle.failures or busy.failures else "")
        + " |",
        f"| plugin still answering at the end (Snapvol.Status) | {status} |",
    ]


def _keep_bound(keep: str, interval: int) -> str:
    """The most automatic snapshots *keep* lets a volume have at a time, where it is simple
    to tell (``last=N``, ``within=DUR``), else the policy itself."""
    tokens = [t for t in keep.replace(",", " ").split() if t]
    if len(tokens) == 1 and tokens[0].startswith("last="):
        return tokens[0][5:]
    if len(tokens) == 1 and tokens[0].startswith("within="):
        from plugin.units import parse_duration
        return str(int(parse_duration(tokens[0][7:]) // interval) + 1)
    return keep


def scheduler_section(args: argparse.Namespace, base: Path | None = None) -> list[str]:
    """The scheduler table with its heading (in *base*, else a directory of its own)."""
    own = base is None
    home = Path(tempfile.mkdtemp(prefix="snapvol-bench-", dir="/tmp")) if own else base
    try:
        rows = scheduler_rows(home, args.scheduler_volumes, args.scheduler_minutes * 60,
                              args.scheduler_keep)
    finally:
        if own and not mounts_under(home):
            shutil.rmtree(home)
    return [f"Automatic snapshots of {args.scheduler_volumes} volumes every minute "
            "(one plugin, Btrfs, its own pool; a shared machine: figures are noisy):\n",
            *rows, ""]


def docker_round_trip(docker: DockerDaemon, image: str, driver: str, repeat: int) -> str:
    samples = []
    for _ in range(repeat):
        name = f"rt{secrets.token_hex(4)}"

        def trip() -> None:
            docker("volume", "create", "-d", driver, name)
            docker("run", "--rm", "--network", "none", "-v", f"{name}:/data", image,
                   "sh", "-c", "echo x > /data/f")
            docker("volume", "rm", name)
        samples.append(timed(trip))
    return summary(samples)


def main() -> None:
    # a TERM (or ^C) still runs every cleanup below: plugins, pools, mounts, daemons
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = argparse.ArgumentParser()
    parser.add_argument("--buttervolume", help="its binary (no buttervolume columns without)")
    parser.add_argument("--bv-max", type=int, default=1000,
                        help="largest volume count for buttervolume (14 s a List at 1,000)")
    parser.add_argument("--sizes", default="10,100,1000,10000",
                        help="volume counts (latency section; buttervolume up to --bv-max)")
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--trips", type=int, default=10)
    # zfs-fuse mounts at most 999 datasets (the 1,000th is made but not mounted, and stays
    # "busy" until zfs-fuse restarts): 900 here; 1000 on OpenZFS (`--sections zfs` in its VM)
    parser.add_argument("--zfs-sizes", default="10,100,900", help="volume counts (zfs section)")
    parser.add_argument("--sections",
                        default="latency,zfs,roundtrip,snapshots,replication,standby,swarm,scale,scheduler",
                        help="which tables to produce, comma-separated")
    parser.add_argument("--snapshot-sizes", default="10,1024,4096", help="MiB of data")
    parser.add_argument("--replication-mb", type=int, default=1024, help="MiB sent (btrfs)")
    parser.add_argument("--zfs-replication-mb", type=int, default=1024, help="MiB sent (zfs)")
    parser.add_argument("--replication-rounds", type=int, default=3,
                        help="turns of raw pipe, send | receive and replicate (medians)")
    parser.add_argument("--no-zfs", action="store_true",
                        help="no zfs-fuse pool, no ZFS rows (a machine where another user owns ZFS)")
    parser.add_argument("--link-mb", type=float, default=30.0,
                        help="MB/s of the slow link in the zstd row")
    # zfs-fuse writes through FUSE at a few tens of MB/s; 4 GiB would take minutes to fill
    parser.add_argument("--zfs-snapshot-max", type=int, default=1024,
                        help="largest data size (MiB) for the ZFS snapshot column")
    parser.add_argument("--standby-mb", type=int, default=1024,
                        help="MiB in the volume handed off (standby section)")
    parser.add_argument("--scale-sizes", default="10,1000,10000",
                        help="volume counts for the scale section (start, memory)")
    parser.add_argument("--swarm-mb", type=int, default=256,
                        help="MiB in the Swarm service's volume (swarm section)")
    # scheduler: 1,000 volumes with schedule=1m for 4 min by default; the long mode is e.g.
    # --scheduler-minutes 30 --scheduler-keep within=10m (prunes reach a steady state)
    parser.add_argument("--scheduler-volumes", type=int, default=1000,
                        help="volumes with a schedule (scheduler section)")
    parser.add_argument("--scheduler-minutes", type=float, default=4.0,
                        help="how long the scheduler section runs once its volumes exist")
    parser.add_argument("--scheduler-keep", default="last=2",
                        help="keep= of the scheduler section's volumes")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    if sections == {"scheduler"}:          # alone: needs neither buttervolume nor ZFS
        print("\n".join(scheduler_section(args)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    base = Path(tempfile.mkdtemp(prefix="snapvol-bench-", dir="/tmp"))
    zfs_sizes = [int(s) for s in args.zfs_sizes.split(",")]
    if sections == {"zfs"}:         # alone (e.g. in the OpenZFS VM): no btrfs, no buttervolume
        print("\n".join(zfs_rows(base, zfs_sizes, args.repeat)))
        shutil.rmtree(base, ignore_errors=True)
        return
    if not args.buttervolume:
        parser.error("--buttervolume is needed unless --sections is zfs")
    out: list[str] = []
    # The mount table lives in /run, which is a tmpfs on every systemd host; where it is not
    # (some VMs and containers), give the plugin one, so the figures are a host's figures.
    run_dir = base / "run"
    run_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "snapvol-bench", str(run_dir)],
                   check=True)
    plugin = PluginProcess(f"snapvolbench{secrets.token_hex(3)}", base / "state",
                           {"SNAPVOL_POOL_SIZE": "12G", "SNAPVOL_LOG_LEVEL": "warning",
                            "SNAPVOL_RUN_DIR": str(run_dir)})
    plugin.start()
    snapvol = Target("snapvol", plugin.socket,
                     lambda name: plugin.call("VolumeDriver.Create", {"Name": name}),
                     lambda: [plugin.pid, *descendants(plugin.pid)])
    # idle = after the start-up jobs (the driver announcer's first check comes 1 s after the
    # worker starts; verify's clean-up and the first scheduler pass at once), not before them
    time.sleep(IDLE_AFTER)
    idle = memory_mib(snapvol.pids())
    docker = None
    try:
        results: dict[tuple[str, int], dict[str, str]] = {}
        # only the sections that use them start buttervolume and ZFS (zfs-fuse, maybe)
        bv_context = (buttervolume(args.buttervolume, base) if args.buttervolume and
                      sections & {"latency", "snapshots"} else nullcontext())
        zfs_context = (zfs_plugin(base) if not args.no_zfs and sections & {"replication", "snapshots"}
                       else nullcontext())
        with bv_context as bv, zfs_context as zfs:
            if "replication" in sections:
                replica = PluginProcess(f"snapvolbenchr{secrets.token_hex(3)}", base / "rstate",
                                        {"SNAPVOL_POOL_SIZE": "8G", "SNAPVOL_LOG_LEVEL": "warning",
                                         "SNAPVOL_RUN_DIR": str(base / "run" / "r")})
                zreplica = None
                try:
                    replica.start()
                    rows = ["| measure | snapvol | alternative | ratio |", "|---|---|---|---|"]
                    rows += replication_rows(snapvol, replica, args.replication_mb, 10, base, "btrfs",
                                             args.replication_rounds)
                    rows += compression_rows(snapvol, replica, 256, args.link_mb, base)
                    if not args.no_zfs:
                        zpool = make_pool(base, size=4 << 30)
                        zreplica = PluginProcess(f"snapvolbenchzr{secrets.token_hex(3)}", base / "zrstate",
                                                 {"SNAPVOL_BACKEND": "zfs", "SNAPVOL_ZFS_ROOT": f"{zpool}/snapvol",
                                                  "SNAPVOL_LOG_LEVEL": "warning",
                                                  "SNAPVOL_RUN_DIR": str(base / "run" / "zr")})
                        zreplica.start()
                        rows += replication_rows(zfs, zreplica, args.zfs_replication_mb, 10, base, "zfs",
                                                 args.replication_rounds)
                    rows += ["", "While four replications hang on a target that never reads:", "",
                             "| measure | hanging | idle | |", "|---|---|---|---|"]
                    rows += latency_while_hanging(snapvol, base, args.repeat)
                    out.append("Send and receive, same run, same data (random, incompressible):\n")
                    out += rows + [""]
                finally:
                    replica.stop()
                    if zreplica is not None:
                        zreplica.stop()
                        destroy_pool(zpool)
            if "standby" in sections:
                out.append("Standby replicas: planned hand-off and failover (two instances, "
                           "Btrfs, random data):\n")
                out += standby_rows(base, args.standby_mb, 16, 5) + [""]
            if "swarm" in sections:
                out.append("A stateful Swarm service drained off its node (two Docker nodes on "
                           "this machine, tests/e2e/nodes.py; busybox with a checksummed file):\n")
                out += swarm_rows(base, args.swarm_mb) + [""]
            if "scheduler" in sections:
                out += scheduler_section(args, base)
            if "snapshots" in sections:
                out.append("Snapshot time against data size, ms, median / p95 of 5 (tar: of 3), "
                           "same run, data freshly written and synced:\n")
                out += snapshot_rows(snapvol, zfs, bv, base,
                                     [int(m) for m in args.snapshot_sizes.split(",")],
                                     args.zfs_snapshot_max, repeat=5)
                out.append("")
            if "scale" in sections:
                out.append("Scale: plugin start and memory against the number of volumes (a "
                           "plugin of its own; start = process start to the first answer):\n")
                out += scale_rows(base, [int(n) for n in args.scale_sizes.split(",")],
                                  args.repeat) + [""]
            # ZFS has a section of its own: here snapvol on Btrfs and buttervolume only
            for n in sizes if "latency" in sections else ():
                for target in (snapvol, bv):
                    if target is None or (target is bv and n > args.bv_max):
                        continue
                    print(f"bench: {target.label} at {n} volumes...", file=sys.stderr)
                    results[(target.label, n)] = latency_rows(target, n, args.repeat)
            bv_memory = memory_mib(bv.pids()) if bv is not None else None
        if "zfs" in sections:
            out += zfs_rows(base, zfs_sizes, args.repeat)
        loaded = memory_mib(snapvol.pids())
        if "latency" not in sections:
            sizes = []
        endpoints = ["Get", "Path", "Mount", "Unmount", "List", "Create", "Remove"]
        labels = ("snapvol", "buttervolume")
        columns = [(label, n) for n in sizes for label in labels if (label, n) in results]
        if sizes:
            out.append("Docker protocol latency over the raw socket, ms, median / p95 "
                       f"({args.repeat} calls; List and Create/Remove fewer):\n")
            out.append("| endpoint | " + " | ".join(f"{label} {n}" for label, n in columns) + " |")
            out.append("|" + "---|" * (1 + len(columns)))
            for ep in endpoints:
                out.append(f"| {ep} | " + " | ".join(results[c][ep] for c in columns) + " |")
            out.append("")
            out.append(f"Memory (RSS / PSS, MiB, all processes): snapvol idle {idle[0]:.1f} / {idle[1]:.1f}; "
                       f"snapvol with {max(sizes)} volumes {loaded[0]:.1f} / {loaded[1]:.1f}; "
                       + (f"buttervolume with {min(max(sizes), args.bv_max)} volumes "
                          f"{bv_memory[0]:.1f} / {bv_memory[1]:.1f}" if bv_memory else "") + "\n")
        if "roundtrip" in sections:
            print("bench: Docker CLI round trips...", file=sys.stderr)
            docker = DockerDaemon(base / "docker")
            docker.base.mkdir()
            docker.start()
            image = docker.import_busybox()
            local = docker_round_trip(docker, image, "local", args.trips)
            ours = docker_round_trip(docker, image, plugin.driver, args.trips)
            ratio = float(ours.split()[0]) / float(local.split()[0])
            out.append("`docker volume create` + `docker run --rm -v` + `docker volume rm`, ms, "
                       f"median / p95 of {args.trips}:\n")
            out += ["| driver | round trip |", "|---|---|", f"| local (Docker's own) | {local} |",
                    f"| snapvol | {ours} |", f"| ratio snapvol / local (median) | {ratio:.2f} |"]
    finally:
        if docker is not None:
            docker.stop()
        plugin.stop()
        for point in mounts_under(base):
            subprocess.run(["umount", point], check=False)
        if not mounts_under(base):
            shutil.rmtree(base)
    print("\n".join(out))


if __name__ == "__main__":
    main()
