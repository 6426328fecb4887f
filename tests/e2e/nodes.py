"""Two Docker nodes on one machine, forming a 2-node Swarm: the harness for Swarm end-to-end tests.

Adapted from the recipe in TESTING.md ("Two Docker nodes and a Swarm on one machine"). Each
node ("a" and "b") lives in namespaces of its own, held open by a small holder process
(``sleep infinity``) started with ``nsenter --net=/run/netns/NS unshare --mount --uts
--propagation private`` (not ``ip netns exec``: it remounts /sys and hides the cgroup mounts
dockerd needs):

* a network namespace, joined to the other node's by a veth pair, on a random 10.x.y.0/24;
* a private mount namespace with a tmpfs on ``/run/docker`` (each node sees only its own
  ``/run/docker/plugins``), and on ``/run/containerd`` when the host has one (so a node's
  dockerd never mistakes the host's containerd for a system containerd of its own);
* a UTS namespace: hostname ``node-a`` / ``node-b`` (what ``node.hostname==`` constraints see).

Every process of a node is started inside all three with ``nsenter -t HOLDER -m -n -u``, in
this order: sshd (on the node's address, port 22, its own host key), snapvol (the plugin as a
host process, driver name ``snapvol``, its embedded Btrfs pool loop-mounted inside the node's
mount namespace), dockerd (own data-root, exec-root in the private tmpfs, socket under BASE so
the host's docker CLI reaches it, ``--cgroup-parent`` of the node's own so its containers can be
found and cleaned up). Teardown is the reverse: dockerd before snapvol (PROTOCOL.md section 4).
Every name is unique per run (``snv<hex>a``...), every process is stopped by the pid we started
it with (checked against its start time, so a reused pid is never signalled).

How a legacy plugin reaches the Swarm scheduler (read in moby v20.10.24, the dockerd here)
--------------------------------------------------------------------------------------------
The scheduler's ``plugin`` filter takes a node's volume drivers from the node's description,
which the node's agent builds with ``executor.Describe`` (daemon/cluster/executor/container/
executor.go): the v1 volume drivers there are ``SystemInfo().Plugins.Volume``, i.e.
``volume/drivers.Store.GetDriverList``, the drivers dockerd has *already looked up* (its
``extensions`` map). A legacy socket in /run/docker/plugins is not among them until something
looks it up: a volume operation naming the driver, or ``docker volume ls``
(``GetAllDrivers`` scans the plugin directories and registers every v1 plugin). A spec file in
/etc/docker/plugins does not change that: it is only another place the same scan looks.
The agent (swarmkit agent/agent.go) computes the description once when it starts (``swarm
init``/``join``, or dockerd's start when it is already in a Swarm), then again only on its
``nodeUpdateTicker``: ``nodeUpdatePeriod = 20 * time.Second``, a constant with no setting,
or on a TLS certificate change. Hence the wait of up to 20 s when ``docker volume ls`` runs
after the node joined (the 15-20 s TESTING.md reports).

So the legitimate fast way, used by :meth:`TwoNodes.up`, is to let each dockerd look the
driver up (``docker volume ls``) *before* it inits or joins the Swarm: the agent's first
description already lists ``{"Type": "Volume", "Name": "snapvol"}``, and the wait for it ends
at its first look (measured here: 0.0-0.1 s after the join). ``up(register_first=False)``
does the lookup right after the join instead: 20.0 s, twice in a row (the first tick after
the join). After a dockerd restart inside the Swarm the agent starts with dockerd, before
anything can run ``docker volume ls``: measured, the driver is missing from the description
for 20.1 s when the node has no snapvol volume, and is there at once when it has one (dockerd
looked the driver up restoring its volumes). :meth:`Node.start_dockerd` does the lookup;
call :meth:`TwoNodes.wait_plugin_known` after it before scheduling onto that node.

Seen in the nodes' dockerd logs: "could not find plugin snapvol.sock in v1 plugin registry" at
every scan. The scan (pkg/plugins/discovery.go ``Scan``) takes every socket in
/run/docker/plugins for a plugin named after the file less its last extension, so the plugin's
stream socket ``snapvol.sock.stream`` reads as a plugin "snapvol.sock" that has no
``snapvol.sock.sock``; dockerd logs it and goes on (harmless, but noise in its log).

Both nodes run the host's dockerd and docker CLI, or another engine's (``TwoNodes(engine=)``,
tests/e2e/engine.py: the engine lane runs trixie's 26.1 this way, beside the host's 20.10).

Command line (for people): ``python -m tests.e2e.nodes up BASE [--engine DIR]`` / ``down
BASE`` (as root, from the repository, with its venv's python).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from plugin.client import PluginClient
from tests.e2e.engine import Engine
from tests.e2e.harness import REPO, SSHD_COMMON, CommandError, DockerDaemon

SOCKET = "/run/docker/plugins/snapvol.sock"      # inside each node's mount namespace
DRIVER = "snapvol"
SNAPVOL_CLI = REPO / ".venv" / "bin" / "snapvol"
PLUGIN_ENTRY = {"Type": "Volume", "Name": DRIVER}
NODE_NAMES = ("a", "b")
EXEC_ROOT = "/run/docker/x"      # each dockerd's, in its node's private /run/docker tmpfs
PROCESSES = ("holder", "sshd", "snapvol", "dockerd", "registry")   # a Node's, by attribute


# ---------------------------------------------------------------------- processes by pid

def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


class Proc:
    """A process we started, known by pid and start time (a reused pid is not ours)."""

    def __init__(self, pid: int, start: int | None = None,
                 popen: subprocess.Popen | None = None) -> None:
        self.pid = pid
        self.start = start if start is not None else _start_time(pid)
        self.popen = popen

    @classmethod
    def of(cls, popen: subprocess.Popen) -> Proc:
        return cls(popen.pid, popen=popen)

    def to_json(self) -> list[int | None]:
        return [self.pid, self.start]

    def alive(self) -> bool:
        if self.popen is not None:
            if self.popen.poll() is not None:
                return False
        start = _start_time(self.pid)
        if start is None or start != self.start:
            return False
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state != "Z"

    def send(self, sig: int) -> None:
        if self.alive():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> bool:
        """Wait until it is gone (reaping it when it is our child); True when it is."""
        deadline = time.monotonic() + timeout
        while True:
            if self.popen is not None:
                try:
                    self.popen.wait(max(0.0, min(0.2, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    pass
            if not self.alive():
                if self.popen is not None:
                    # it may have died between alive()'s poll and its look at /proc (a
                    # zombie): reap it now, or its Popen warns "still running" when collected
                    try:
                        self.popen.wait(5)
                    except subprocess.TimeoutExpired:
                        pass
                return True
            if time.monotonic() >= deadline:
                return False
            if self.popen is None:
                time.sleep(0.1)

    def stop(self, timeout: float = 30, sig: int = signal.SIGTERM) -> None:
        """*sig*, then SIGKILL after *timeout* seconds."""
        self.send(sig)
        if not self.wait(timeout):
            self.send(signal.SIGKILL)
            self.wait(10)


def _netns_inode(name: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return None


def _pids_in_netns(inode: int) -> list[int]:
    found = []
    for pid in _all_pids():
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino == inode:
                found.append(pid)
        except OSError:
            continue
    return found


def _pids_in_cgroup(parent: str) -> list[int]:
    """Processes in *parent* (a cgroup path like /snv12ab34a) or below it, any hierarchy."""
    found = []
    for pid in _all_pids():
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:
            continue
        if any(line.split(":", 2)[2] == parent or line.split(":", 2)[2].startswith(parent + "/")
               for line in lines if line.count(":") >= 2):
            found.append(pid)
    return found


def _remove_cgroups(parent: str) -> list[str]:
    """rmdir *parent* (deepest first) in every cgroup hierarchy; return what stays."""
    left = []
    root = Path("/sys/fs/cgroup")
    tops = [root / parent.lstrip("/")] + [h / parent.lstrip("/") for h in root.iterdir()
                                         if h.is_dir() and not h.is_symlink()]
    for top in tops:
        if not top.is_dir():
            continue
        dirs = sorted((d for d, _, _ in os.walk(top)), key=len, reverse=True)
        for d in dirs:
            try:
                os.rmdir(d)
            except OSError:
                pass
        if top.exists():
            left.append(str(top))
    return left


def _sigkill_until_gone(find: Any, what: str, pause: float) -> None:
    """SIGKILL what *find()* returns until it returns nothing (50 rounds *pause* apart);
    raise RuntimeError(*what*: the pids) if something stays."""
    for _ in range(50):
        pids = find()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(pause)
    raise RuntimeError(f"{what}: {sorted(find())}")


def _loop_devices_under(base: Path) -> list[str]:
    """Loop devices whose backing file is at or below *base* (only ours can be)."""
    out = subprocess.run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"],
                         capture_output=True, text=True).stdout
    found = []
    for device in json.loads(out or "{}").get("loopdevices", []):
        back = (device.get("back-file") or "").removesuffix(" (deleted)")
        if back == str(base) or back.startswith(str(base) + "/"):
            found.append(device["name"])
    return found


def _free_subnet() -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 no interface or route of the host uses."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    used += subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    for _ in range(100):
        net = ipaddress.ip_network(f"10.{random.randint(100, 254)}.{random.randint(0, 255)}.0/24")
        prefix = str(net.network_address).rsplit(".", 1)[0] + "."
        if prefix not in used:
            return net
    raise RuntimeError("no free 10.x.y.0/24 found")


def run(argv: list[str], timeout: float = 60, check: bool = True,
        **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise CommandError(f"{' '.join(argv)} failed ({proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc


# ---------------------------------------------------------------------- one node

class NodeDocker(DockerDaemon):
    """The node's dockerd: the CLI side of harness.DockerDaemon; started by its Node."""

    def start(self) -> None:                 # pragma: no cover - Node.start_dockerd does it
        raise NotImplementedError("use Node.start_dockerd()")

    def stop(self) -> None:                  # pragma: no cover
        raise NotImplementedError("use Node.stop_dockerd()")


class Node:
    """One Docker node: its namespaces, sshd, snapvol and dockerd."""

    def __init__(self, nodes: TwoNodes, name: str, ip: str) -> None:
        self.nodes = nodes
        self.name = name
        self.hostname = f"node-{name}"
        self.ip = ip
        self.netns = f"{nodes.prefix}{name}"
        self.veth = f"{nodes.prefix}{name}0"
        self.cgroup_parent = f"/{nodes.prefix}{name}"
        self.dir = nodes.base / name
        # socket: DIR/docker.sock, on the host's /tmp; the CLI of the nodes' engine
        self.docker = NodeDocker(self.dir, cli=nodes.engine.cli)
        self.docker_host = f"unix://{self.docker.socket}"
        self.advertise = f"ssh://root@{ip}{SOCKET}"
        self.run_dir = f"/run/docker/snapvol-{self.netns}"   # in the node's private tmpfs
        self.holder: Proc | None = None
        self.sshd: Proc | None = None
        self.snapvol: Proc | None = None
        self.dockerd: Proc | None = None
        self.registry: Proc | None = None

    def __repr__(self) -> str:
        return f"<Node {self.hostname} {self.ip} {self.docker_host}>"

    # -- state (so that `down BASE` works from another process)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ip": self.ip,
                **{k: getattr(self, k).to_json() for k in PROCESSES
                   if getattr(self, k) is not None}}

    def load(self, data: dict[str, Any]) -> None:
        for key in PROCESSES:
            if key in data:
                setattr(self, key, Proc(*data[key]))

    # -- entering the node

    def enter(self, *argv: str, wd: Path | str = "/") -> list[str]:
        """*argv* run inside the node's network, mount and UTS namespaces."""
        assert self.holder is not None and self.holder.alive(), f"{self.hostname} is not up"
        return ["nsenter", "-t", str(self.holder.pid), "-m", "-n", "-u", f"--wd={wd}", "--", *argv]

    def run(self, *argv: str, timeout: float = 60, check: bool = False,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return run(self.enter(*argv), timeout=timeout, check=check, env=env)

    def path(self, inside: str | Path) -> Path:
        """A path of the node's mount namespace, reachable from the host (through the
        holder's /proc/PID/root)."""
        assert self.holder is not None
        return Path(f"/proc/{self.holder.pid}/root") / str(inside).lstrip("/")

    def _spawn(self, argv: list[str], log: Path, env: dict[str, str] | None = None,
               wd: Path | str = "/") -> Proc:
        with log.open("ab") as out:
            popen = subprocess.Popen(self.enter(*argv, wd=wd), stdout=out, stderr=out,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     env=env)
        return Proc.of(popen)     # nsenter without a pid namespace execs: the pid is argv's

    # -- namespaces

    def create_namespaces(self) -> None:
        """The holder: inside the netns, new mount + UTS namespaces, set up, then sleep."""
        self.dir.mkdir(parents=True, exist_ok=True)
        script = (f"hostname {self.hostname} && "
                  "mount -t tmpfs -o mode=0755 snapvol-node /run/docker && "
                  "mkdir -p /run/docker/plugins && "
                  "{ [ ! -d /run/containerd ] || "
                  "mount -t tmpfs -o mode=0711 snapvol-node /run/containerd; } && "
                  "ip link set lo up && echo ready && exec sleep infinity")
        log = (self.dir / "holder.log").open("ab")
        popen = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--mount", "--uts",
             "--propagation", "private", "sh", "-c", script],
            stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.holder = Proc.of(popen)
        self.nodes.save()
        assert popen.stdout is not None
        line = popen.stdout.readline()            # EOF when the script failed
        popen.stdout.close()
        if line.strip() != b"ready":
            raise RuntimeError(f"{self.hostname}: namespaces not set up: "
                               f"{(self.dir / 'holder.log').read_text()[-2000:]}")
        self.holder.start = _start_time(self.holder.pid)   # after the execs, to be exact

    # -- sshd

    def start_sshd(self) -> None:
        ssh_dir = self.dir / "ssh"
        config = ssh_dir / "sshd_config"
        config.write_text(f"""\
Port 22
ListenAddress {self.ip}
HostKey {ssh_dir / 'host_key'}
AuthorizedKeysFile {self.nodes.ssh_dir / 'authorized_keys'}
{SSHD_COMMON}PrintMotd no
PidFile {ssh_dir / 'sshd.pid'}
""")
        Path("/run/sshd").mkdir(exist_ok=True)    # sshd's privilege separation directory
        self.sshd = self._spawn(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], ssh_dir / "sshd.log")
        self.nodes.save()

    def ssh(self, other: Node, *command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """ssh from inside this node to *other*, with the plugin's key and known_hosts."""
        return self.run("ssh", *self.nodes.ssh_options(), f"root@{other.ip}", *command,
                        timeout=timeout)

    # -- snapvol

    def snapvol_env(self) -> dict[str, str]:
        nodes = self.nodes
        return {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                "SNAPVOL_SOCKET": SOCKET,
                "SNAPVOL_STATE_DIR": str(self.dir / "state"),
                "SNAPVOL_RUN_DIR": self.run_dir,
                "SNAPVOL_POOL_SIZE": "2G",
                "SNAPVOL_PIDFILE": str(self.dir / "snapvol.pid"),
                "SNAPVOL_LOG_LEVEL": "info",
                "SNAPVOL_DOCKER_HOST": self.docker_host,
                "SNAPVOL_SSH_KEY": str(nodes.client_key),
                "SNAPVOL_SSH_KNOWN_HOSTS": str(nodes.known_hosts),
                "SNAPVOL_REMOTE_SNAPVOL": str(SNAPVOL_CLI),
                "SNAPVOL_ADVERTISE": self.advertise,
                **nodes.extra_env}

    @property
    def snapvol_log(self) -> Path:
        return self.dir / "snapvol.log"

    def start_snapvol(self, timeout: float = 60) -> None:
        """Start (or restart) the node's snapvol and wait until it answers."""
        assert not (self.snapvol and self.snapvol.alive()), f"{self.hostname}: snapvol runs already"
        argv = [sys.executable, "-m", "plugin.serve", "-c", "python:plugin.gunicorn_conf"]
        self.snapvol = self._spawn(argv, self.snapvol_log, env=self.snapvol_env(), wd=REPO)
        self.nodes.save()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.snapvol.alive():
                raise RuntimeError(f"{self.hostname}: snapvol exited: "
                                   f"{self.snapvol_log.read_text()[-3000:]}")
            try:
                if PluginClient(str(self.path(SOCKET)), timeout=10).call("Snapvol.Status")[0] == 200:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.hostname}: snapvol did not answer in {timeout} s: "
                           f"{self.snapvol_log.read_text()[-3000:]}")

    def _snapvol_workers(self) -> list[Proc]:
        if self.snapvol is None or not self.snapvol.alive():
            return []
        return [Proc(pid) for pid in _all_pids() if _ppid(pid) == self.snapvol.pid]

    def kill_snapvol(self) -> None:
        """SIGKILL the gunicorn master, as a crash would; wait until its worker noticed and
        left too (it does within seconds), so a restart finds the state directory free."""
        assert self.snapvol is not None and self.snapvol.alive(), \
            f"{self.hostname}: snapvol is not running"
        workers = self._snapvol_workers()
        self.snapvol.send(signal.SIGKILL)
        self.snapvol.wait(30)
        for worker in workers:
            if not worker.wait(30):
                worker.stop(0, signal.SIGKILL)

    def stop_snapvol(self) -> None:
        if self.snapvol is None:
            return
        workers = self._snapvol_workers()
        self.snapvol.stop(30)
        for worker in workers:
            worker.stop(10)

    def snapvol_cli(self, *args: str, timeout: float = 120) -> tuple[int, str, str]:
        """``snapvol --socket SOCKET ARGS`` inside the node: (exit code, stdout, stderr)."""
        proc = self.run(str(SNAPVOL_CLI), "--socket", SOCKET, *args, timeout=timeout)
        return proc.returncode, proc.stdout, proc.stderr

    # -- dockerd

    def start_dockerd(self, timeout: float = 60, lookup: bool = True) -> None:
        """Start (or restart) the node's dockerd (snapvol must be running: it starts first)
        and, with *lookup*, let it look the snapvol driver up once (see the module's docstring)."""
        assert self.snapvol is not None and self.snapvol.alive(), \
            f"{self.hostname}: snapvol must start before dockerd"
        assert not (self.dockerd and self.dockerd.alive()), f"{self.hostname}: dockerd runs already"
        engine = self.nodes.engine
        argv = [engine.dockerd, "--data-root", str(self.dir / "data"), "--exec-root", EXEC_ROOT,
                "--host", self.docker_host, "--pidfile", str(self.dir / "dockerd.pid"),
                "--bridge=none", "--iptables=false", "--ip-masq=false",
                "--cgroup-parent", self.cgroup_parent]
        self.dockerd = self._spawn(argv, self.docker.log, env={**os.environ, "PATH": engine.path()})
        self.nodes.save()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.dockerd.alive():
                raise RuntimeError(f"{self.hostname}: dockerd exited: "
                                   f"{self.docker.log.read_text()[-2000:]}")
            if self.docker.socket.exists() and self.docker.result("info", timeout=30).returncode == 0:
                break
            time.sleep(0.3)
        else:
            raise RuntimeError(f"{self.hostname}: dockerd did not answer in {timeout} s: "
                               f"{self.docker.log.read_text()[-2000:]}")
        if lookup:
            self.docker("volume", "ls", timeout=60)     # dockerd looks every legacy driver up

    def kill_dockerd(self) -> None:
        """SIGKILL dockerd, as a crash would (its containers stay; its containerd dies with it).
        Returns once that containerd is reaped, not just dead: a restarted dockerd takes a
        containerd pid that still exists, even a zombie's, for a containerd still running and
        gives up on its dead socket ("timeout waiting for containerd to start"). The pid 1 of
        some machines (this VM's) reaps orphans only every few seconds."""
        assert self.dockerd is not None and self.dockerd.alive(), \
            f"{self.hostname}: dockerd is not running"
        children = [Proc(pid) for pid in _all_pids() if _ppid(pid) == self.dockerd.pid]
        self.dockerd.send(signal.SIGKILL)
        self.dockerd.wait(30)
        deadline = time.monotonic() + 60
        while any(_start_time(c.pid) == c.start for c in children):
            assert time.monotonic() < deadline, \
                f"{self.hostname}: dockerd's children not reaped in 60 s"
            time.sleep(0.1)

    def crash(self) -> None:
        """The host is lost, as far as Docker and snapvol can tell: SIGKILL snapvol first (no
        sync leaves after this moment), then its containers' processes (everything in the
        node's cgroup: a database dies mid-write, and what it commits meanwhile is lost, as on
        a host that dies), then dockerd. sshd stays, as on a host whose services died: a
        peer's ssh then fails at the plugin, not at the connection (both must read as
        "unreachable")."""
        for worker in self._snapvol_workers():     # at once: a worker outliving its master
            worker.send(signal.SIGKILL)            # would go on syncing for a moment
        self.kill_snapvol()
        _sigkill_until_gone(lambda: set(_pids_in_cgroup(self.cgroup_parent)) - {os.getpid()},
                            f"{self.hostname}: container processes left", pause=0.1)
        self.kill_dockerd()

    def stop_dockerd(self) -> None:
        if self.dockerd is None or not self.dockerd.alive():
            return
        ids = self.docker("ps", "-aq", check=False, timeout=30).split()
        if ids and all(len(i) == 12 for i in ids):
            self.docker("rm", "-f", *ids, check=False, timeout=120)
        self.dockerd.stop(60)

    def plugins_in_description(self) -> list[dict[str, str]] | None:
        """This node's ``.Description.Engine.Plugins`` as the Swarm manager has it."""
        manager = self.nodes.manager
        out = manager.docker.result("node", "inspect", "--format",
                                    "{{json .Description.Engine.Plugins}}", self.hostname, timeout=30)
        if out.returncode != 0:
            return None
        return json.loads(out.stdout)

    # -- a registry on the node's loopback

    def start_registry(self, storage: Path, timeout: float = 30) -> str:
        """Serve the registry storage *storage* (a ``docker-registry`` filesystem root, e.g.
        what tests/e2e/publish.py filled) on this node's loopback, where its dockerd trusts
        plain HTTP as it does on any 127.0.0.0/8 (the host's loopback is another network
        namespace: the node's dockerd cannot reach a registry there). Returns its address.
        Stopped by :meth:`teardown`.

        :raises RuntimeError: it does not answer within *timeout* seconds (with its log).
        """
        assert not (self.registry and self.registry.alive()), f"{self.hostname}: registry runs"
        address = f"127.0.0.1:{random.randint(20000, 29999)}"   # the node's own port space
        directory = self.dir / "registry"
        directory.mkdir(exist_ok=True)
        config, log = directory / "config.yml", directory / "registry.log"
        config.write_text(f"version: 0.1\nlog: {{level: warn}}\n"
                          f"storage: {{filesystem: {{rootdirectory: {storage}}}}}\n"
                          f"http: {{addr: {address}}}\n")
        self.registry = self._spawn(["docker-registry", "serve", str(config)], log)
        self.nodes.save()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.registry.alive():
                break
            # busybox's wget, run in the node's network namespace (urllib here runs in ours)
            if self.run("busybox", "wget", "-q", "-O", "/dev/null", f"http://{address}/v2/",
                        timeout=10).returncode == 0:
                return address
            time.sleep(0.2)
        raise RuntimeError(f"{self.hostname}: registry on {address} did not answer: "
                           f"{log.read_text(errors='replace')[-2000:]}")

    # -- images

    def load_image(self, source_docker_env: dict[str, str], tag: str) -> None:
        """``docker save`` TAG from another dockerd (its env: DOCKER_HOST...) | ``docker load`` here."""
        save = subprocess.Popen(["docker", "save", tag], env=source_docker_env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        load = subprocess.run([self.docker.cli, "load", "-q"], env=self.docker.env, stdin=save.stdout,
                              capture_output=True, text=True, timeout=600)
        assert save.stdout is not None and save.stderr is not None
        save.stdout.close()
        save_err = save.stderr.read().decode(errors="replace")
        save.stderr.close()
        if save.wait(60) != 0 or load.returncode != 0:
            raise CommandError(f"{self.hostname}: docker save {tag} | docker load failed: "
                               f"{save_err.strip()} {load.stderr.strip()}")

    # -- teardown

    def teardown(self, errors: list[str]) -> None:
        """Everything of this node in order, whatever state it is in (partial up, killed
        dockerd or snapvol): dockerd, snapvol, sshd, what else runs in its namespaces or
        cgroups, the mounts in its mount namespace, the holder."""
        def step(what: str, fn: Any) -> None:
            try:
                fn()
            except Exception as exc:      # noqa: BLE001 - carry on, report at the end
                errors.append(f"{self.hostname}: {what}: {exc}")

        step("stop dockerd", self.stop_dockerd)
        step("stop snapvol", self.stop_snapvol)
        step("stop the registry", lambda: self.registry and self.registry.stop(10))
        step("stop sshd", lambda: self.sshd and self.sshd.stop(10))
        step("kill the rest", self._kill_rest)
        step("unmount", self._unmount_all)
        step("stop the holder", lambda: self.holder and self.holder.stop(10, signal.SIGKILL))
        step("remove cgroups", lambda: _remove_cgroups(self.cgroup_parent))

    def _kill_rest(self) -> None:
        holder = self.holder.pid if self.holder else None
        inode = _netns_inode(self.netns)

        def ours() -> set[int]:
            pids = set(_pids_in_cgroup(self.cgroup_parent))
            if inode is not None:
                pids |= set(_pids_in_netns(inode))
            return pids - {holder, os.getpid()}
        _sigkill_until_gone(ours, "processes left", pause=0.2)

    def _unmount_all(self) -> None:
        """Unmount, inside the node's mount namespace, what was mounted there (the pool, the
        containers' layers and netns files, the tmpfs): the loop device of the pool is
        freed now, not whenever the namespace is reaped."""
        if self.holder is None or not self.holder.alive():
            return
        base = str(self.nodes.base)
        ours = (base, "/run/docker", "/run/containerd")
        points = []
        for line in Path(f"/proc/{self.holder.pid}/mountinfo").read_text().splitlines():
            point = line.split()[4]
            if any(point == p or point.startswith(p + "/") for p in ours):
                points.append(point)
        for point in sorted(set(points), key=len, reverse=True):
            if run(self.enter("umount", point), check=False, timeout=60).returncode != 0:
                run(self.enter("umount", "-l", point), check=False, timeout=60)


# ---------------------------------------------------------------------- the pair

class TwoNodes:
    """Two Docker nodes "a" and "b" on one machine, one the Swarm manager (*manager*, "a"
    unless told), the other a worker; see the module. A test that kills a node's dockerd
    kills the worker: a 2-node Swarm whose only manager is gone schedules nothing. *engine*:
    the dockerd and docker CLI both nodes run (default: the host's, from PATH)."""

    def __init__(self, base: Path, extra_env: dict[str, str] | None = None,
                 manager: str = "a", engine: Engine | None = None) -> None:
        if manager not in NODE_NAMES:
            raise ValueError(f"manager must be one of {NODE_NAMES}")
        self.base = Path(base).resolve()
        self.engine = engine or Engine()
        self.extra_env = dict(extra_env or {})
        self.manager_name = manager
        self.prefix = f"snv{secrets.token_hex(3)}"
        self.subnet = _free_subnet()
        hosts = list(self.subnet.hosts())
        self.nodes = {n: Node(self, n, str(hosts[i])) for i, n in enumerate(NODE_NAMES)}
        self.ssh_dir = self.base / "ssh"
        self.client_key = self.ssh_dir / "client_key"
        self.known_hosts = self.ssh_dir / "known_hosts"
        self.timings: dict[str, float] = {}
        self._started = False
        self._lock = threading.Lock()

    @property
    def a(self) -> Node:
        return self.nodes["a"]

    @property
    def b(self) -> Node:
        return self.nodes["b"]

    @property
    def manager(self) -> Node:
        return self.nodes[self.manager_name]

    @property
    def worker(self) -> Node:
        return next(n for n in self if n.name != self.manager_name)

    def __iter__(self):
        return iter(self.nodes.values())

    def __enter__(self) -> TwoNodes:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # -- state file

    @property
    def state_file(self) -> Path:
        return self.base / "nodes.json"

    def save(self) -> None:
        with self._lock:
            self._save()

    def _save(self) -> None:
        data = {"prefix": self.prefix, "subnet": str(self.subnet), "extra_env": self.extra_env,
                "manager": self.manager_name,
                "engine": str(self.engine.root) if self.engine.root else None,
                "nodes": [n.to_json() for n in self]}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.state_file)

    @classmethod
    def load(cls, base: Path) -> TwoNodes:
        data = json.loads((Path(base) / "nodes.json").read_text())
        engine = Engine(Path(data["engine"])) if data.get("engine") else None
        nodes = cls(base, data.get("extra_env"), data.get("manager", "a"), engine)
        nodes.prefix = data["prefix"]
        nodes.subnet = ipaddress.ip_network(data["subnet"])
        nodes.nodes = {}
        for entry in data["nodes"]:
            node = Node(nodes, entry["name"], entry["ip"])
            node.load(entry)
            nodes.nodes[node.name] = node
        nodes._started = True
        return nodes

    def ssh_options(self) -> list[str]:
        """The options the plugin's replication uses (plugin/replication.py)."""
        return ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "ConnectTimeout=10",
                "-i", str(self.client_key), "-o", "IdentitiesOnly=yes"]

    # -- up

    def up(self, register_first: bool = True, plugin_wait: float = 60) -> None:
        """Bring both nodes and the Swarm up, and wait until the Swarm scheduler knows the
        snapvol driver on both. *register_first*: let dockerd look the driver up before the
        Swarm forms (fast); False: after (the 20 s agent tick; for measuring)."""
        started = time.monotonic()
        self.base.mkdir(parents=True, exist_ok=True)
        if any(p.name != "nodes.json" for p in self.base.iterdir()):
            raise RuntimeError(f"{self.base} is not empty: TwoNodes removes its base at down()")
        self._started = True
        self.save()
        # network: two namespaces and a veth pair
        for node in self:
            run(["ip", "netns", "add", node.netns])
        run(["ip", "link", "add", self.a.veth, "netns", self.a.netns, "type", "veth",
             "peer", "name", self.b.veth, "netns", self.b.netns])
        for node in self:
            run(["ip", "-n", node.netns, "addr", "add", f"{node.ip}/{self.subnet.prefixlen}",
                 "dev", node.veth])
            run(["ip", "-n", node.netns, "link", "set", node.veth, "up"])
        # keys: one client key for both, a host key each, one known_hosts
        self.ssh_dir.mkdir()
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "snapvol-nodes",
             "-f", str(self.client_key)])
        (self.ssh_dir / "authorized_keys").write_text((self.ssh_dir / "client_key.pub").read_text())
        known = []
        for node in self:
            (node.dir / "ssh").mkdir(parents=True)
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", node.hostname,
                 "-f", str(node.dir / "ssh" / "host_key")])
            kind, key = (node.dir / "ssh" / "host_key.pub").read_text().split()[:2]
            known.append(f"{node.ip} {kind} {key}\n")
        self.known_hosts.write_text("".join(known))
        # per node: namespaces, sshd, snapvol, dockerd (both nodes at once)
        self._parallel(lambda n: (n.create_namespaces(), n.start_sshd()))
        self._wait_ssh()
        self._parallel(lambda n: n.start_snapvol())
        self._parallel(lambda n: n.start_dockerd(lookup=register_first))
        self.timings["nodes"] = time.monotonic() - started
        # the Swarm
        manager, worker = self.manager, self.worker
        manager.docker("swarm", "init", "--advertise-addr", manager.ip,
                       "--listen-addr", f"{manager.ip}:2377")
        token = manager.docker("swarm", "join-token", "-q", "worker").strip()
        worker.docker("swarm", "join", "--token", token, "--advertise-addr", worker.ip,
                      "--listen-addr", f"{worker.ip}:2377", f"{manager.ip}:2377")
        self.timings["swarm"] = time.monotonic() - started
        if not register_first:
            self._parallel(lambda n: n.docker("volume", "ls", timeout=60))
        self.timings["up"] = time.monotonic() - started
        known_at = time.monotonic()
        self.wait_plugin_known(plugin_wait)
        self.timings["plugin_known"] = time.monotonic() - known_at
        self.timings["up_total"] = time.monotonic() - started

    def _parallel(self, fn: Any) -> None:
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            for future in [pool.submit(fn, n) for n in self]:
                future.result()

    def _wait_ssh(self, timeout: float = 60) -> None:
        """Each node reaches the other's sshd (and its own) with the shared keys. A try that
        hangs is abandoned and made again (seen once in a rehearsal: the first ssh into a
        node just started hung past 20 s, and its timeout failed the whole engine lane)."""
        deadline = time.monotonic() + timeout
        for src in self:
            for dst in self:
                while True:
                    try:
                        probe = src.ssh(dst, "hostname", timeout=10)
                    except subprocess.TimeoutExpired:
                        why = "a try hung for 10 s"
                    else:
                        if probe.returncode == 0 and probe.stdout.strip() == dst.hostname:
                            break
                        why = probe.stderr.strip()
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"ssh {src.hostname} -> {dst.hostname}: {why}; "
                                           f"{(dst.dir / 'ssh' / 'sshd.log').read_text()[-1500:]}")
                    time.sleep(0.2)

    def load_images(self, source_docker_env: dict[str, str], *tags: str) -> None:
        """*tags* from another dockerd into both nodes: one ``docker save`` to a file, then
        a ``docker load`` on each node at once (what :meth:`Node.load_image` does for one)."""
        archive = self.base / "images.tar"
        try:
            run(["docker", "save", "-o", str(archive), *tags], env=source_docker_env, timeout=600)
            self._parallel(lambda n: n.docker("load", "-q", "-i", str(archive), timeout=600))
        finally:
            archive.unlink(missing_ok=True)

    def wait_plugin_known(self, timeout: float = 60) -> None:
        """Until the manager's view of every node lists the snapvol volume driver."""
        deadline = time.monotonic() + timeout
        while True:
            missing = [n.hostname for n in self
                       if PLUGIN_ENTRY not in (n.plugins_in_description() or [])]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"snapvol not in the Swarm description of {missing} "
                                   f"after {timeout} s: "
                                   f"{[n.plugins_in_description() for n in self]}")
            time.sleep(0.25)

    # -- down

    def down(self) -> None:
        """Remove everything up() made, whatever state it got to; raise if anything stays."""
        if not self._started:
            return
        started = time.monotonic()
        errors: list[str] = []
        for node in (self.worker, self.manager):
            if node.dockerd is not None and node.dockerd.alive():
                node.docker.result("swarm", "leave", "--force", timeout=60)
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            for future in [pool.submit(n.teardown, errors) for n in self]:
                future.result()
        for node in self:
            if _netns_inode(node.netns) is not None:
                proc = run(["ip", "netns", "del", node.netns], check=False)
                if proc.returncode != 0:
                    errors.append(f"ip netns del {node.netns}: {proc.stderr.strip()}")
        for node in self:                         # gone with the netns; never in the host's
            if Path(f"/sys/class/net/{node.veth}").exists():
                run(["ip", "link", "del", node.veth], check=False)
        for attempt in range(50):                 # autoclear may lag the last umount a little
            loops = _loop_devices_under(self.base)
            if not loops:
                break
            if attempt == 25:
                for device in loops:
                    run(["losetup", "-d", device], check=False)
            time.sleep(0.2)
        errors += self.leftovers()
        if not errors:
            shutil.rmtree(self.base, ignore_errors=True)
            if self.base.exists():
                errors.append(f"{self.base} could not be removed")
        self.timings["down"] = time.monotonic() - started
        self._started = False
        if errors:
            raise RuntimeError("TwoNodes.down() left things behind:\n" + "\n".join(errors))

    def leftovers(self) -> list[str]:
        """What of ours still exists: namespaces, links, loop devices, mounts, processes."""
        left = []
        netns = run(["ip", "netns", "list"], check=False).stdout
        left += [f"netns {n.netns}" for n in self if n.netns in netns.split()]
        left += [f"link {n.veth}" for n in self if Path(f"/sys/class/net/{n.veth}").exists()]
        left += [f"loop device {d}" for d in _loop_devices_under(self.base)]
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            left += [f"mount {line.split()[4]}" for line in f
                     if line.split()[4].startswith(str(self.base))]
        for node in self:
            for what in PROCESSES:
                proc = getattr(node, what)
                if proc is not None and proc.alive():
                    left.append(f"{node.hostname} {what} pid {proc.pid}")
            left += [f"{node.hostname} process {pid} in cgroup {node.cgroup_parent}"
                     for pid in _pids_in_cgroup(node.cgroup_parent)]
            left += [f"cgroup {d}" for d in _remove_cgroups(node.cgroup_parent)]
        return left


# ---------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.nodes",
                                     description="Two Docker nodes in a Swarm on this machine (root).")
    parser.add_argument("action", choices=("up", "down"))
    parser.add_argument("base", type=Path, help="a new or empty directory (removed by down)")
    parser.add_argument("--manager", choices=NODE_NAMES, default="a",
                        help="the node that inits the Swarm (default a)")
    parser.add_argument("--engine", type=Path, metavar="DIR",
                        help="run the dockerd and docker CLI unpacked in DIR (what "
                             "scripts/newer-engine prints) instead of the host's")
    args = parser.parse_args(argv)
    if args.action == "up":
        nodes = TwoNodes(args.base, manager=args.manager,
                         engine=Engine(args.engine) if args.engine else None)
        try:
            nodes.up()
        except BaseException:
            nodes.down()
            raise
        for node in nodes:
            print(f"{node.hostname}: {node.ip}  DOCKER_HOST={node.docker_host}  "
                  f"SNAPVOL_ADVERTISE={node.advertise}")
        for node in nodes:
            print(f"enter {node.hostname}: nsenter -t {node.holder.pid} -m -n -u")
        print("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in nodes.timings.items()))
        print(f"remove: python -m tests.e2e.nodes down {nodes.base}")
    else:
        nodes = TwoNodes.load(args.base)
        nodes.down()
        print(f"down in {nodes.timings['down']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
