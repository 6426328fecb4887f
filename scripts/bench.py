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
from contextlib import contextmanager
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


def replication_rows(source: Target, replica: PluginProcess, size_mb: int, changed_mb: int,
                     base: Path, kind: str) -> list[str]:
    """Full send+receive through snapvol against the raw native pipe on the same snapshot,
    an incremental stream against the bytes changed, and tar+gzip of the same volume."""
    name = f"repl{secrets.token_hex(3)}"
    source.call("VolumeDriver.Create", {"Name": name})
    path = source.call("VolumeDriver.Mount", {"Name": name, "ID": "bench"})["Mountpoint"]
    print(f"bench: {source.label}: writing {size_mb} MiB for replication...", file=sys.stderr)
    fill(path, size_mb << 20)
    source.call("Snapvol.SnapshotCreate", {"Volumes": [name], "Name": "s1"})
    size = size_mb << 20
    # raw native pipe, on the same snapshot, into the replica's storage
    if kind == "btrfs":
        snap = Path(path).parent.parent / "snapshots" / name / "s1"
        scratch = replica.state_dir / "pool" / "bench-raw"
        scratch.mkdir()
        # ...then committed, as snapvol's receive is when it makes the volume (a snapshot
        # commits the transaction): both columns end with the data on disk
        raw = pipe_time(["btrfs", "send", "-q", str(snap)], ["btrfs", "receive", "-q", str(scratch)],
                        ["btrfs", "filesystem", "sync", str(scratch)])
        btrfsutil.set_subvolume_read_only(str(scratch / "s1"), False)
        btrfsutil.delete_subvolume(str(scratch / "s1"))
        scratch.rmdir()
    else:
        dataset = f"{source.zfs_root}/{name}@s1"
        target = f"{replica.env['SNAPVOL_ZFS_ROOT']}/benchraw"
        # ...then one property set (a transaction group sync), as snapvol's receive does
        raw = pipe_time(["zfs", "send", dataset], ["zfs", "receive", "-u", target],
                        ["zfs", "set", "canmount=noauto", target])
        subprocess.run(["zfs", "destroy", "-r", target], check=True)
    sender = cli(source.socket, "send", f"{name}@s1", stdout=subprocess.PIPE)
    ours = pipe_time(sender, [str(REPO / ".venv" / "bin" / "snapvol"), "--socket", str(replica.socket),
                              "receive", name])
    # plugin to plugin: snapvol replicate to the second instance's socket (no CLI in the path)
    started = time.perf_counter()
    proc = cli(source.socket, "replicate", name, f"unix://{replica.socket}", "--as", f"{name}r",
               "--snapshot", "s1", stdout=subprocess.DEVNULL)
    if proc.wait() != 0:
        raise RuntimeError(proc.stderr.read().decode())
    direct = time.perf_counter() - started
    replica.call("VolumeDriver.Remove", {"Name": f"{name}r"})
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
    replica.call("VolumeDriver.Remove", {"Name": name})
    mib = size / (1 << 20)
    return [f"| {source.label}: full send + receive of {size_mb} MiB | {mib / ours:.0f} MiB/s "
            f"({ours:.2f} s) | raw `{kind} send \\| {kind} receive`: {mib / raw:.0f} MiB/s ({raw:.2f} s) | "
            f"{raw / ours * 100:.0f} % |",
            f"| {source.label}: `snapvol replicate` of the same snapshot to a second instance | "
            f"{mib / direct:.0f} MiB/s ({direct:.2f} s) | raw pipe as above | {raw / direct * 100:.0f} % |",
            f"| {source.label}: incremental stream after writing {changed_mb} MiB | "
            f"{inc / (1 << 20):.1f} MiB | changed: {changed_mb} MiB | {inc / (changed_mb << 20):.2f}x |",
            f"| {source.label}: `tar -cz` of the same volume | {mib / tgz:.0f} MiB/s ({tgz:.2f} s) | "
            f"archive {tgz_size / (1 << 20):.0f} MiB | snapvol full is {tgz / ours:.1f}x faster |"]


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
    parser.add_argument("--buttervolume", help="needed by every section but zfs")
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--trips", type=int, default=10)
    # zfs-fuse serves every mounted dataset as a FUSE mount of its own daemon: at 1,000 it
    # stalls; measure ZFS rows up to 100 by default (raise it on OpenZFS)
    parser.add_argument("--zfs-max", type=int, default=100,
                        help="largest volume count for the ZFS rows")
    parser.add_argument("--zfs-sizes", default="10,100,1000", help="volume counts (zfs section)")
    parser.add_argument("--sections",
                        default="latency,zfs,roundtrip,snapshots,replication,standby,swarm",
                        help="which tables to produce, comma-separated")
    parser.add_argument("--snapshot-sizes", default="10,1024,4096", help="MiB of data")
    parser.add_argument("--replication-mb", type=int, default=1024, help="MiB sent (btrfs)")
    parser.add_argument("--zfs-replication-mb", type=int, default=1024, help="MiB sent (zfs)")
    # zfs-fuse writes through FUSE at a few tens of MB/s; 4 GiB would take minutes to fill
    parser.add_argument("--zfs-snapshot-max", type=int, default=1024,
                        help="largest data size (MiB) for the ZFS snapshot column")
    parser.add_argument("--standby-mb", type=int, default=1024,
                        help="MiB in the volume handed off (standby section)")
    parser.add_argument("--swarm-mb", type=int, default=256,
                        help="MiB in the Swarm service's volume (swarm section)")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
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
        with buttervolume(args.buttervolume, base) as bv, zfs_plugin(base) as zfs:
            if "replication" in sections:
                replica = PluginProcess(f"snapvolbenchr{secrets.token_hex(3)}", base / "rstate",
                                        {"SNAPVOL_POOL_SIZE": "8G", "SNAPVOL_LOG_LEVEL": "warning",
                                         "SNAPVOL_RUN_DIR": str(base / "run" / "r")})
                zreplica = None
                try:
                    replica.start()
                    rows = ["| measure | snapvol | alternative | ratio |", "|---|---|---|---|"]
                    rows += replication_rows(snapvol, replica, args.replication_mb, 10, base, "btrfs")
                    zpool = make_pool(base, size=4 << 30)
                    zreplica = PluginProcess(f"snapvolbenchzr{secrets.token_hex(3)}", base / "zrstate",
                                             {"SNAPVOL_BACKEND": "zfs", "SNAPVOL_ZFS_ROOT": f"{zpool}/snapvol",
                                              "SNAPVOL_LOG_LEVEL": "warning",
                                              "SNAPVOL_RUN_DIR": str(base / "run" / "zr")})
                    zreplica.start()
                    rows += replication_rows(zfs, zreplica, args.zfs_replication_mb, 10, base, "zfs")
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
            if "snapshots" in sections:
                out.append("Snapshot time against data size, ms, median / p95 of 5 (tar: of 3), "
                           "same run, data freshly written and synced:\n")
                out += snapshot_rows(snapvol, zfs, bv, base,
                                     [int(m) for m in args.snapshot_sizes.split(",")],
                                     args.zfs_snapshot_max, repeat=5)
                out.append("")
            for n in sizes if "latency" in sections else ():
                for target in (snapvol, zfs, bv):
                    if target is zfs and n > args.zfs_max:
                        continue
                    print(f"bench: {target.label} at {n} volumes...", file=sys.stderr)
                    results[(target.label, n)] = latency_rows(target, n, args.repeat)
            bv_memory = memory_mib(bv.pids())
        if "zfs" in sections:
            out += zfs_rows(base, zfs_sizes, args.repeat)
        loaded = memory_mib(snapvol.pids())
        if "latency" not in sections:
            sizes = []
        endpoints = ["Get", "Path", "Mount", "Unmount", "List", "Create", "Remove"]
        labels = ("snapvol", "snapvol-zfs", "buttervolume")
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
                       f"buttervolume with {max(sizes)} volumes {bv_memory[0]:.1f} / {bv_memory[1]:.1f}\n")
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
