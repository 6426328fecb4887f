"""Real parts for the end-to-end tier: a private dockerd, snapvol plugin processes, a busybox image.

The private dockerd (own data-root, exec-root and socket) keeps these tests off any daemon
that is already running on a shared machine: dockerd caches every legacy volume driver it has
used until it restarts, and stalls 15 s per ``docker volume ls`` once that driver's socket is
gone (PROTOCOL.md section 4). Each run uses a unique driver name, and the daemon is stopped
before the plugin, so nothing that outlives the run ever knew our driver.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from plugin.client import PluginClient, UnixHTTPConnection

REPO = Path(__file__).resolve().parents[2]
BUSYBOX_IMAGE = "snapvol-test/busybox:e2e"


class CommandError(AssertionError):
    pass


def mounts_under(base: Path) -> list[str]:
    """Mount points at or below *base*, deepest first (from /proc/self/mountinfo)."""
    prefix = str(base)
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            point = line.split()[4]
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


class DockerDaemon:
    """A dockerd of our own, with no bridge network and no iptables changes. *cli*: the
    docker CLI that talks to it (the engine's own, for a dockerd not on PATH)."""

    def __init__(self, base: Path, cli: str = "docker") -> None:
        self.base = base
        self.cli = cli
        self.socket = base / "docker.sock"
        # docker-compose v1 gives up on a request after 60 s: a volume call that waits on a
        # busy plugin (zfs-fuse, a loaded CI machine) may take longer, as dockerd allows
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}",
                    "COMPOSE_HTTP_TIMEOUT": "300"}
        self.log = base / "dockerd.log"
        self._proc: subprocess.Popen[bytes] | None = None

    # dockerd gives the containerd it starts a short, fixed time to answer; in the OpenZFS
    # lane's emulated VM on a loaded machine that was once too short ("failed to start
    # containerd: timeout waiting for containerd to start", and dockerd exits). Started
    # again, dockerd adopts the containerd still coming up (its pid file), so a few tries
    # ride out a slow moment; any other exit fails at once.
    START_TRIES = 3

    def start(self) -> None:
        argv = ["dockerd", "--data-root", str(self.base / "data"),
                "--exec-root", str(self.base / "exec"), "--host", f"unix://{self.socket}",
                "--pidfile", str(self.base / "docker.pid"), "--bridge=none",
                "--iptables=false", "--ip-masq=false"]
        for attempt in range(1, self.START_TRIES + 1):
            logged = self.log.stat().st_size if self.log.exists() else 0
            with self.log.open("ab") as log:
                self._proc = subprocess.Popen(argv, stdout=log, stderr=log,
                                              stdin=subprocess.DEVNULL, start_new_session=True)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    said = self.log.read_bytes()[logged:].decode(errors="replace")
                    if "failed to start containerd" in said and attempt < self.START_TRIES:
                        break
                    raise RuntimeError(f"dockerd exited: {said[-2000:]}")
                if self.socket.exists() and subprocess.run(
                        [self.cli, "info"], env=self.env, capture_output=True).returncode == 0:
                    return
                time.sleep(0.3)
            else:
                raise RuntimeError(f"dockerd did not answer in 60 s: {self.log.read_text()[-2000:]}")

    def __call__(self, *args: str, check: bool = True, timeout: float = 180,
                 input: str | None = None) -> str:
        """Run the docker CLI against this daemon; return stdout (stderr in the failure)."""
        proc = subprocess.run([self.cli, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise CommandError(f"docker {' '.join(args)} failed ({proc.returncode}): "
                               f"{proc.stderr.strip()}")
        return proc.stdout if check else proc.stdout + proc.stderr

    def result(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.cli, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def import_busybox(self) -> str:
        """A tiny image made of busybox-static with every applet linked."""
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "root"
            (root / "bin").mkdir(parents=True)
            shutil.copy("/bin/busybox", root / "bin" / "busybox")
            applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True,
                                     check=True).stdout.split()
            for applet in applets:
                if applet != "busybox":
                    (root / "bin" / applet).symlink_to("busybox")
            (root / "tmp").mkdir()
            archive = Path(tmp) / "busybox.tar"
            with tarfile.open(archive, "w") as tar:
                tar.add(root, arcname=".")
            subprocess.run([self.cli, "import", "--change", "ENV PATH=/bin", str(archive),
                            BUSYBOX_IMAGE], env=self.env, check=True, capture_output=True)
        return BUSYBOX_IMAGE

    def stop(self) -> None:
        if self._proc is None:
            return
        ids = self("ps", "-aq", check=False).split()
        if ids and all(len(i) == 12 for i in ids):
            self("rm", "-f", *ids, check=False, timeout=120)
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(10)
        for point in mounts_under(self.base):
            subprocess.run(["umount", "-l", point], check=False)
        self._proc = None


class PluginProcess:
    """One snapvol instance (gunicorn) on a legacy socket with a unique driver name."""

    def __init__(self, driver: str, state_dir: Path, extra_env: dict[str, str] | None = None,
                 socket_dir: Path = Path("/run/docker/plugins")) -> None:
        """*socket_dir*: where dockerd finds legacy plugins by default; an instance no dockerd
        should see (the tortures') gets a directory of its own."""
        self.driver = driver
        self.state_dir = state_dir
        self.socket = socket_dir / f"{driver}.sock"
        self.log = state_dir.parent / f"{driver}.log"
        self.pidfile = state_dir.parent / f"{driver}.pid"
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    "SNAPVOL_SOCKET": str(self.socket), "SNAPVOL_STATE_DIR": str(state_dir),
                    "SNAPVOL_RUN_DIR": f"/run/snapvol/{driver}",   # unique: removed by stop()
                    "SNAPVOL_POOL_SIZE": "3G", "SNAPVOL_PIDFILE": str(self.pidfile),
                    "SNAPVOL_LOG_LEVEL": "info",
                    # how the other instances here reach this one (standby hand-offs)
                    "SNAPVOL_ADVERTISE": f"unix://{self.socket}", **(extra_env or {})}
        self.run_dir = Path(self.env["SNAPVOL_RUN_DIR"])
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self, timeout: float = 60) -> None:
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "plugin.serve", "-c", "python:plugin.gunicorn_conf"],
                cwd=REPO, env=self.env, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"plugin exited ({self._proc.returncode}): {self.log_tail()}")
            try:
                if self.call("Snapvol.Status")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"plugin did not answer in {timeout} s: {self.log_tail()}")

    @property
    def name(self) -> str:
        return self.driver

    @property
    def backend(self) -> str:
        return self.env.get("SNAPVOL_BACKEND", "btrfs")

    @property
    def zfs_root(self) -> str | None:
        return self.env.get("SNAPVOL_ZFS_ROOT")

    def volume_dir(self, volume: str) -> Path:
        """The volume's directory on the host."""
        if self.backend == "zfs":
            return self.state_dir / "zfs" / volume
        return self.state_dir / "pool" / "volumes" / volume

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def call(self, endpoint: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        return PluginClient(str(self.socket), timeout=30).call(endpoint, body or {})

    def raw(self, path: str, body: bytes, method: str = "POST") -> tuple[int, bytes]:
        """Send *body* exactly as given (no Content-Type, as dockerd does)."""
        conn = UnixHTTPConnection(str(self.socket), timeout=30)
        try:
            conn.request(method, path, body=body)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the gunicorn master only, as a crash of the plugin's main process would."""
        assert self._proc is not None
        self._proc.send_signal(sig)
        self._proc.wait(30)

    def stop(self) -> None:
        """Stop the plugin and remove its run-time directory (it is unique to this run)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._proc = None
        shutil.rmtree(self.run_dir, ignore_errors=True)


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def remove_volume(instance: Any, name: str, timeout: float = 60.0) -> None:
    """VolumeDriver.Remove on *instance* until the volume is removed or gone.

    Why: a transfer of the volume (a sync, a replication) refuses Remove for a moment, and a
    test's volume left behind with a schedule or standbys keeps taking the instance's
    transfer slots during later tests."""
    deadline = time.monotonic() + timeout
    while True:
        status, reply = instance.call("VolumeDriver.Remove", {"Name": name})
        if status in (200, 404):
            return
        assert time.monotonic() < deadline, f"cannot remove {name}: {reply}"
        time.sleep(0.5)


def inspect_volume(docker: DockerDaemon, name: str) -> dict[str, Any]:
    return json.loads(docker("volume", "inspect", name))[0]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """Debian's docker-registry on loopback (dockerd trusts plain HTTP on 127.0.0.0/8)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import urllib.request
        self.base.mkdir(parents=True, exist_ok=True)
        config = self.base / "config.yml"
        config.write_text(f"version: 0.1\nlog: {{level: warn}}\n"
                          f"storage: {{filesystem: {{rootdirectory: {self.base / 'data'}}}}}\n"
                          f"http: {{addr: {self.address}}}\n")
        with (self.base / "registry.log").open("ab") as log:
            self._proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log,
                                          stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://{self.address}/v2/", timeout=2).read()
                return
            except OSError:
                if self._proc.poll() is not None:
                    break
                time.sleep(0.2)
        raise RuntimeError(f"registry did not start: {(self.base / 'registry.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(30)
            self._proc = None


class ManagedPlugin:
    """A snapvol installed with `docker plugin install` into a private dockerd."""

    def __init__(self, docker: DockerDaemon, name: str, zfs_root: str | None = None) -> None:
        self.docker = docker
        self.name = name                        # e.g. snapvolmgd:latest (the driver name)
        self.driver = name
        self.zfs_root = zfs_root                # SNAPVOL_ZFS_ROOT when installed with zfs
        self.backend = "zfs" if zfs_root else "btrfs"

    @classmethod
    def install(cls, docker: DockerDaemon, reference: str, prefix: str, *settings: str,
                zfs_root: str | None = None) -> ManagedPlugin:
        """`docker plugin install` *reference* under a unique alias ``<prefix><hex>:latest``
        with *settings* (plus ``SNAPVOL_BACKEND=zfs`` and *zfs_root* when given), and wait
        until it answers."""
        alias = f"{prefix}{secrets.token_hex(3)}:latest"
        if zfs_root:
            settings = (*settings, "SNAPVOL_BACKEND=zfs", f"SNAPVOL_ZFS_ROOT={zfs_root}")
        docker("plugin", "install", "--grant-all-permissions", "--alias", alias, reference,
               *settings, timeout=300)
        plugin = cls(docker, alias, zfs_root=zfs_root)
        plugin.wait_answering()
        return plugin

    def inspect(self) -> dict[str, Any]:
        return json.loads(self.docker("plugin", "inspect", self.name))[0]

    @property
    def id(self) -> str:
        return self.inspect()["Id"]

    @property
    def socket(self) -> Path:
        # dockerd 20.10 keeps managed plugins' sockets here whatever its --exec-root
        return Path("/run/docker/plugins") / self.id / "snapvol.sock"

    def volume_dir(self, volume: str) -> Path:
        """The volume's directory on the host (through the propagated mount)."""
        propagated = self.docker.base / "data" / "plugins" / self.id / "propagated-mount"
        if self.backend == "zfs":
            return propagated / "zfs" / volume
        return propagated / "pool" / "volumes" / volume

    def call(self, endpoint: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        return PluginClient(str(self.socket), timeout=30).call(endpoint, body or {})

    def processes(self) -> list[int]:
        """Pids of the plugin's processes: those in the cgroup named after its ID."""
        plugin_id = self.id
        pids = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    if plugin_id in (proc / "cgroup").read_text():
                        pids.append(int(proc.name))
                except OSError:
                    continue
        return sorted(pids)

    def enabled(self) -> bool | None:
        """dockerd's word on whether the plugin is enabled (None: dockerd did not answer)."""
        out = self.docker("plugin", "inspect", "--format", "{{.Enabled}}", self.name,
                          check=False, timeout=30).strip()
        return {"true": True, "false": False}.get(out)

    def wait_answering(self, timeout: float = 60) -> None:
        """Wait until the plugin answers ``Snapvol.Status``; fail at once, with the plugin's
        log and dockerd's, when dockerd has given up on it (it disables a plugin whose socket
        does not accept within about 10 s of a start), or after *timeout* seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.call("Snapvol.Status")[0] == 200:
                    return
            except (OSError, KeyError, IndexError, CommandError):
                pass
            if self.enabled() is False:
                raise RuntimeError(f"dockerd disabled managed plugin {self.name}\n"
                                   f"{self.diagnostics()}")
            time.sleep(0.3)
        raise RuntimeError(f"managed plugin {self.name} does not answer after {timeout} s\n"
                           f"{self.diagnostics()}")

    def diagnostics(self, lines: int = 60) -> str:
        """What explains a plugin that does not answer: its own log (its stdout and stderr,
        which dockerd writes into its log tagged with the plugin's id), the rest of dockerd's
        log, and the plugin's processes."""
        log = self.docker.log.read_text(errors="replace").splitlines()
        try:
            plugin_id = self.id
        except CommandError as exc:
            plugin_id, own, rest = "?", [f"(no plugin id: {exc})"], log
        else:
            own = [line for line in log if plugin_id in line]
            rest = [line for line in log if plugin_id not in line]
        try:
            procs = [f"{pid} " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                     for pid in self.processes()]
        except OSError as exc:
            procs = [f"({exc})"]
        kernel = subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines()
        return "\n".join([f"--- plugin {self.name} ({plugin_id}): its log, last {lines} lines",
                          *own[-lines:], f"--- dockerd's log, last {lines // 2} other lines",
                          *rest[-(lines // 2):], "--- its processes", *procs,
                          "--- the kernel's log, last 15 lines", *kernel[-15:]])

    def remove(self) -> None:
        """Remove its volumes, then the plugin itself."""
        for volume in self.docker("volume", "ls", "-q", "--filter", f"driver={self.name}",
                                  check=False).split():
            self.docker("volume", "rm", "-f", volume, check=False)
        self.docker("plugin", "disable", "-f", self.name, check=False)
        self.docker("plugin", "rm", "-f", self.name, check=False)


def build_plugin(docker: DockerDaemon, reference: str) -> None:
    """scripts/build-plugin into *docker* (the README's way of building the plugin)."""
    proc = subprocess.run([str(REPO / "scripts" / "build-plugin"), reference], env=docker.env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise CommandError(f"build-plugin {reference} failed: {proc.stderr[-3000:]}")


def build_test_image(docker: DockerDaemon, tag: str, context: Path) -> str:
    """``docker build`` of a test image on the Debian base scripts/build-plugin uses (made with
    debootstrap and cached where no registry is reachable); apt reaches the mirror through
    ``--network host``. Returns *tag*."""
    if docker.result("image", "inspect", tag).returncode == 0:
        return tag
    base = "snapvol-build/debian:bookworm"
    subprocess.run(["bash", "-c", '. "$1/scripts/lib.sh" && ensure_debian_base "$2"', "_",
                    str(REPO), base], env=docker.env, check=True, timeout=900)
    docker("build", "-q", "--network", "host", "--build-arg", f"BASE={base}", "-t", tag,
           str(context), timeout=900)
    return tag


# The sshd_config lines every test sshd shares. SHLVL=1 makes the session's bash a nested
# shell, so it skips the ~/.bashrc that bash reads for ssh commands: a test host must not run
# this machine's interactive set-up. Here that is `pyenv init`, whose rehash waits 60 s on a
# lock that a killed session left behind (seen in CI: every ssh into a fresh node hung).
SSHD_COMMON = """\
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
SetEnv SHLVL=1
"""


class SshServer:
    """sshd on 127.0.0.1 with keys of the test's own (host and client), root by key only."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = free_port()
        self.client_key = base / "client_key"
        self.known_hosts = base / "known_hosts"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        host_key = self.base / "host_key"
        for key in (host_key, self.client_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        (self.base / "authorized_keys").write_text((self.base / "client_key.pub").read_text())
        public = (self.base / "host_key.pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {public[0]} {public[1]}\n")
        config = self.base / "sshd_config"
        config.write_text(f"""\
Port {self.port}
ListenAddress 127.0.0.1
HostKey {host_key}
AuthorizedKeysFile {self.base / 'authorized_keys'}
{SSHD_COMMON}PidFile {self.base / 'sshd.pid'}
""")
        Path("/run/sshd").mkdir(exist_ok=True)   # sshd's privilege separation directory
        with (self.base / "sshd.log").open("wb") as log:
            self._proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                                          stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            probe = subprocess.run(["ssh", *self.options(), "root@127.0.0.1", "true"],
                                   capture_output=True, timeout=20)
            if probe.returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"sshd did not answer: {(self.base / 'sshd.log').read_text()[-2000:]}")

    def options(self) -> list[str]:
        return ["-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-i", str(self.client_key), "-p", str(self.port)]

    def env(self) -> dict[str, str]:
        """The settings a plugin needs to replicate to this server."""
        return {"SNAPVOL_SSH_KEY": str(self.client_key), "SNAPVOL_SSH_KNOWN_HOSTS": str(self.known_hosts),
                "SNAPVOL_REMOTE_SNAPVOL": str(REPO / ".venv" / "bin" / "snapvol")}

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)
            self._proc = None
