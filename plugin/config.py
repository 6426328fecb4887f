"""Settings: every knob is a ``SNAPVOL_*`` environment variable, parsed once at start.

``Settings.SPEC`` is the single table the README and ``config.json`` are checked against.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

from .errors import ConfigError
from .targets import Target
from .units import parse_duration, parse_size


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in allowed:
            raise ValueError(f"must be one of: {', '.join(allowed)}")
        return raw
    return parse


def _seconds(raw: str) -> float:
    value = float(raw)
    if not 0 < value <= 3600:
        raise ValueError("must be a number of seconds between 0 and 3600")
    return value


def _volume_count(raw: str) -> int:
    if not raw.isdigit() or int(raw) > 10_000_000:
        raise ValueError("must be a whole number of volumes from 0 to 10000000")
    return int(raw)


def _docker_host(raw: str) -> str:
    if not raw.startswith(("unix:///", "tcp://")):
        raise ValueError("must be unix:///path/to/docker.sock or tcp://host:port")
    return raw


def _transfers(raw: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= 16:
        raise ValueError("must be a number from 1 to 16")
    return int(raw)


def _advertise(value: str) -> str:
    if not value:
        return ""
    try:
        return str(Target.parse(value))
    except ValueError as exc:
        raise ValueError(str(exc)) from None


def _text(raw: str) -> str:
    if not raw or not re.fullmatch(r"[A-Za-z0-9_./-]+", raw) or raw.startswith("-"):
        raise ValueError("must be a command name or path (letters, digits, _ . / -)")
    return raw


def _optional_text(raw: str) -> str:
    return _text(raw) if raw else ""


def _threads(raw: str) -> int:
    value = int(raw)
    if not 1 <= value <= 64:
        raise ValueError("must be a whole number between 1 and 64")
    return value


def _absolute_path(raw: str) -> Path:
    path = Path(raw)
    if not path.is_absolute():
        raise ValueError("must be an absolute path")
    return path


def _optional_path(raw: str) -> Path | None:
    return _absolute_path(raw) if raw else None


def _dataset(raw: str) -> str:
    if raw and not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.:-]*(/[A-Za-z0-9][A-Za-z0-9_.:-]*)*", raw):
        raise ValueError("must be a dataset name such as tank/snapvol")
    return raw


def _metrics_address(raw: str) -> tuple[str, int] | None:
    """``off`` -> None; ``HOST:PORT`` (an IPv4 address, ``[IPv6]`` or ``localhost``) ->
    (host, port)."""
    if raw == "off":
        return None
    match = re.fullmatch(r"(\d{1,3}(?:\.\d{1,3}){3}|\[[0-9A-Fa-f:.]{2,45}\]|localhost):(\d{1,5})", raw)
    if not match or not 1 <= int(match.group(2)) <= 65535:
        raise ValueError("must be off or HOST:PORT, e.g. 127.0.0.1:9618 or [::1]:9618")
    return match.group(1).strip("[]"), int(match.group(2))


def _trash_ttl(raw: str) -> int:
    """``0`` (no trash) or a duration such as ``24h``, at most a year: seconds."""
    if raw.strip() == "0":
        return 0
    seconds = parse_duration(raw)
    if not 60 <= seconds <= 365 * 86400:
        raise ValueError("must be 0 (no trash) or from 1m to 1y, e.g. 24h or 7d")
    return seconds


def _percent(raw: str) -> int:
    value = raw.strip().removesuffix("%")
    if not value.isdigit() or not 50 <= int(value) <= 99:
        raise ValueError("must be a whole percentage from 50 to 99, e.g. 90")
    return int(value)


def _pool_size(raw: str) -> int:
    size = parse_size(raw)
    if size < 256 << 20:
        raise ValueError("must be at least 256M (btrfs needs room for its metadata)")
    return size


@dataclass(frozen=True)
class Settings:
    """The plugin's configuration; build it with :meth:`from_env`."""

    backend: str
    btrfs_root: Path | None
    zfs_root: str
    publish_dir: Path | None
    state_dir: Path
    socket: Path
    run_dir: Path | None
    pool_image: Path | None
    pool_size: int
    lock_timeout: float
    threads: int
    log_level: str
    docker_host: str
    hook_timeout: float
    transfers: int
    transfer_timeout: float
    stream_compression: str
    ssh_key: str
    ssh_known_hosts: str
    ssh_dir: Path | None
    remote_snapvol: str
    advertise: str
    metrics: tuple[str, int] | None
    trash_ttl: int
    trash_full: int
    recycle_drop: int
    recycle_quiet: float

    # field -> (environment variable, default, parser, help)
    SPEC: ClassVar[dict[str, tuple[str, str, Callable[[str], object], str]]] = {
        "backend": ("SNAPVOL_BACKEND", "btrfs", _choice("btrfs", "zfs"),
                    "storage backend: btrfs or zfs"),
        "btrfs_root": ("SNAPVOL_BTRFS_ROOT", "", _optional_path,
                       "a directory on a mounted Btrfs where volumes live; empty: the state "
                       "directory if it is on Btrfs, else the embedded pool image in it"),
        "zfs_root": ("SNAPVOL_ZFS_ROOT", "", _dataset,
                     "zfs: the parent dataset of all volumes, e.g. tank/snapvol (created if "
                     "missing; the pool must exist)"),
        "publish_dir": ("SNAPVOL_PUBLISH_DIR", "", _optional_path,
                        "managed plugin: its propagatedMount; the storage is mounted at "
                        "PUBLISH_DIR/pool so Docker can reach every volume; empty on a host"),
        "state_dir": ("SNAPVOL_STATE_DIR", "/var/lib/snapvol", _absolute_path,
                      "lock, pid and log files, and the embedded pool (pool.img, pool/)"),
        "socket": ("SNAPVOL_SOCKET", "/run/docker/plugins/snapvol.sock", _absolute_path,
                   "Unix socket served to Docker; its file name (without .sock) is the "
                   "driver name"),
        "run_dir": ("SNAPVOL_RUN_DIR", "", _optional_path,
                    "run-time state that lives as long as the boot (the table of Docker "
                    "mounts); empty: /run/snapvol/<driver name>"),
        "pool_image": ("SNAPVOL_POOL_IMAGE", "", _optional_path,
                       "image file of the embedded pool; empty: STATE_DIR/pool.img"),
        "pool_size": ("SNAPVOL_POOL_SIZE", "10G", _pool_size,
                      "size of the embedded pool image when it is first created (sparse)"),
        "lock_timeout": ("SNAPVOL_LOCK_TIMEOUT", "20", _seconds,
                         "longest wait for a busy volume before answering 'busy'"),
        "threads": ("SNAPVOL_THREADS", "8", _threads, "request threads of the server"),
        "log_level": ("SNAPVOL_LOG_LEVEL", "info", _choice("debug", "info", "warning", "error"),
                      "log verbosity"),
        "docker_host": ("SNAPVOL_DOCKER_HOST", "unix:///var/run/docker.sock", _docker_host,
                        "Docker Engine API used to pause containers for consistent snapshots "
                        "(quiesce) and to name the containers of a volume"),
        "hook_timeout": ("SNAPVOL_HOOK_TIMEOUT", "60", _seconds,
                         "longest run of a container's snapvol.pre-snapshot or "
                         "snapvol.post-snapshot hook"),
        "transfers": ("SNAPVOL_TRANSFERS", "4", _transfers,
                      "send, receive and replication streams that may run at once (the rest "
                      "of the request threads stay free for Docker)"),
        "transfer_timeout": ("SNAPVOL_TRANSFER_TIMEOUT", "120", _seconds,
                             "a replication whose target makes no progress for this long fails"),
        "stream_compression": ("SNAPVOL_STREAM_COMPRESSION", "none", _choice("none", "zstd"),
                               "compress replication streams with zstd (for slow links and "
                               "compressible data; costs CPU): none or zstd"),
        "ssh_key": ("SNAPVOL_SSH_KEY", "", _optional_text,
                    "private key for ssh:// replication targets; empty: the first of id_ed25519, "
                    "id_ecdsa, id_rsa in SNAPVOL_SSH_DIR, else ssh's defaults"),
        "ssh_known_hosts": ("SNAPVOL_SSH_KNOWN_HOSTS", "", _optional_text,
                            "known_hosts file for ssh:// targets (host keys are always "
                            "checked); empty: SNAPVOL_SSH_DIR/known_hosts, else "
                            "/root/.ssh/known_hosts"),
        "ssh_dir": ("SNAPVOL_SSH_DIR", "", _optional_path,
                    "a directory with the private key and known_hosts for ssh:// targets "
                    "(the managed plugin's ssh mount); empty: none"),
        "advertise": ("SNAPVOL_ADVERTISE", "", _advertise,
                      "how other snapvol hosts reach this one (ssh://[user@]host[:port]"
                      "[/plugin.sock]): standbys ask it for hand-offs, a new primary syncs "
                      "back to it; empty: standbys of volumes here cannot ask for hand-offs"),
        "metrics": ("SNAPVOL_METRICS", "off", _metrics_address,
                    "TCP address of the Prometheus /metrics endpoint (HOST:PORT, e.g. "
                    "127.0.0.1:9618), or off"),
        "remote_snapvol": ("SNAPVOL_REMOTE_SNAPVOL", "snapvol", _text,
                           "the snapvol command on ssh:// targets (a name on their PATH or a path)"),
        "trash_ttl": ("SNAPVOL_TRASH_TTL", "24h", _trash_ttl,
                      "how long docker volume rm keeps a volume, with its snapshots, in the "
                      "trash (snapvol trash ls|restore|purge); 0: no trash, rm destroys"),
        "trash_full": ("SNAPVOL_TRASH_FULL", "90", _percent,
                       "pool fill (percent) from which trashed volumes are purged, oldest "
                       "first, and rm destroys at once"),
        "recycle_drop": ("SNAPVOL_RECYCLE_DROP", "1000", _volume_count,
                         "when this many volumes (with the trash) fewer than the most the "
                         "worker held remain, and it is idle, a fresh worker replaces it to "
                         "give the memory back; 0: never"),
        "recycle_quiet": ("SNAPVOL_RECYCLE_QUIET", "60", _seconds,
                          "how long the number of volumes must stay unchanged before that"),
    }

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Parse every setting from *env*, falling back to the defaults in :attr:`SPEC`.

        :raises ConfigError: a value does not parse; the message names the variable.
        """
        values = {}
        for f in fields(cls):
            var, default, parse, _ = cls.SPEC[f.name]
            raw = env.get(var, default)
            try:
                values[f.name] = parse(raw)
            except ValueError as exc:
                raise ConfigError(f"{var}={raw!r}: {exc}") from None
        if values["backend"] == "zfs" and not values["zfs_root"]:
            raise ConfigError("SNAPVOL_ZFS_ROOT is required when SNAPVOL_BACKEND=zfs "
                              "(the parent dataset of the volumes, e.g. tank/snapvol)")
        return cls(**values)

    @property
    def driver(self) -> str:
        """The name Docker knows this instance by: the socket's file name without ``.sock``."""
        return self.socket.name.removesuffix(".sock")

    @property
    def mount_table(self) -> Path:
        """Where the Docker mount IDs live: tmpfs by default, cleared at boot like the mounts."""
        return (self.run_dir or Path("/run/snapvol") / self.driver) / "mounts.json"

    @property
    def zfs_mounts(self) -> Path:
        """Where ZFS volumes are mounted (under the propagated mount for a managed plugin)."""
        return (self.publish_dir or self.state_dir) / "zfs"

    @property
    def image_path(self) -> Path:
        return self.pool_image or self.state_dir / "pool.img"

    @property
    def pool_mountpoint(self) -> Path:
        """Where the storage is mounted when snapvol mounts it (image, or bind for Docker)."""
        return (self.publish_dir or self.state_dir) / "pool"
