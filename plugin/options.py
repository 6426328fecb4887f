"""Volume options (``docker volume create -o k=v``, Compose ``driver_opts``): validation.

Every option is checked at Create, before anything is made: unknown names, options of the
other backend and bad values are refused with a message that names the option and what it
accepts. The result is a normalised ``dict[str, str]`` that is stored with the volume.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass

from . import targets, verify_spec
from .errors import InvalidName, InvalidOption
from .names import snapshot_name, volume_name
from .retention import Policy
from .units import parse_duration, parse_size

DEFAULT_KEEP = "24h,7d,4w,12m"   # retention of a schedule given without keep=
MAX_ID = 2**32 - 2          # (uid_t)-1 means "unchanged" to chown(2)
MIN_SIZE = 1 << 20
MAX_SIZE = 1 << 60          # 1 EiB: far beyond any disk, far below u64 overflow in btrfs/zfs


def _size(value: str) -> str:
    size = parse_size(value)
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError("must be between 1M and 1048576T")
    return value.strip()


def _id(value: str) -> str:
    if not value.isdigit() or not 0 <= int(value) <= MAX_ID:
        raise ValueError(f"must be a number from 0 to {MAX_ID}")
    return str(int(value))


def _mode(value: str) -> str:
    if not re.fullmatch(r"0?[0-7]{3,4}", value) or int(value, 8) > 0o7777:
        raise ValueError("must be octal permission bits such as 755, 0750 or 1777")
    return format(int(value, 8), "o")


def _one_of(*allowed: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value
    return parse


def _recordsize(value: str) -> str:
    size = parse_size(value)
    if size < 512 or size > 1 << 20 or size & (size - 1):
        raise ValueError("must be a power of 2 from 512 to 1M, e.g. 16K or 128K")
    return value.strip()


def _origin(value: str) -> str:
    """``VOL`` or ``VOL@SNAP``: names checked here so a bad one never reaches a backend."""
    volume, _, snapshot = value.partition("@")
    try:
        volume_name(volume)
        if snapshot or "@" in value:
            snapshot_name(snapshot)
    except InvalidName as exc:
        raise ValueError(f"expected VOLUME or VOLUME@SNAPSHOT ({exc})") from None
    return value


MAX_SCHEDULE = 365 * 86400


def _schedule(value: str) -> str:
    seconds = parse_duration(value)
    if not 1 <= seconds <= MAX_SCHEDULE:
        raise ValueError("must be from 1s to 1y, e.g. 15m, 1h or 1d")
    return value.strip()


def _keep(value: str) -> str:
    return str(Policy.parse(value))


def _target(value: str) -> str:
    return str(targets.Target.parse(value))


MAX_STANDBYS = 4


def _targets(value: str) -> str:
    parts = [p.strip() for p in value.split(",")]
    if not 1 <= len(parts) <= MAX_STANDBYS or not all(parts):
        raise ValueError(f"give 1 to {MAX_STANDBYS} targets separated by commas, each "
                         + targets.GRAMMAR)
    parsed = [str(targets.Target.parse(p)) for p in parts]
    if len(set(parsed)) != len(parsed):
        raise ValueError("a standby is given twice")
    return ",".join(parsed)


def _boolean(value: str) -> str:
    lowered = value.lower()
    if lowered in ("true", "yes", "on", "1"):
        return "true"
    if lowered in ("false", "no", "off", "0"):
        return "false"
    raise ValueError("must be true or false")


@dataclass(frozen=True)
class OptionSpec:
    name: str
    parse: Callable[[str], str]
    backends: frozenset[str]
    help: str


_BOTH = frozenset({"btrfs", "zfs"})
SPECS: dict[str, OptionSpec] = {spec.name: spec for spec in (
    OptionSpec("size", _size, _BOTH, "hard quota, e.g. 20G (btrfs: qgroup limit)"),
    OptionSpec("uid", _id, _BOTH, "owner of the volume's root directory"),
    OptionSpec("gid", _id, _BOTH, "group of the volume's root directory"),
    OptionSpec("mode", _mode, _BOTH, "permissions of the volume's root directory, e.g. 750"),
    OptionSpec("compression", str, _BOTH,
               "transparent compression: what the filesystem supports (checked per backend)"),
    OptionSpec("nocow", _boolean, frozenset({"btrfs"}),
               "true: no copy-on-write for files in the volume (databases, VM images)"),
    OptionSpec("from", _origin, _BOTH,
               "clone of VOLUME (a snapshot taken now) or of VOLUME@SNAPSHOT"),
    OptionSpec("recordsize", _recordsize, frozenset({"zfs"}), "ZFS record size, e.g. 16K"),
    OptionSpec("atime", _one_of("on", "off"), frozenset({"zfs"}), "ZFS access-time updates"),
    OptionSpec("schedule", _schedule, _BOTH,
               "take an automatic snapshot every interval: s, m, h, d, w or y, e.g. 1h"),
    OptionSpec("keep", _keep, _BOTH, "retention of automatic snapshots, e.g. 24h,7d,4w,12m "
               f"(default {DEFAULT_KEEP}); grammar: last=N, within=DUR, Nh Nd Nw Nm Ny"),
    OptionSpec("quiesce", _one_of("none", "pause"), _BOTH,
               "pause: pause the volume's containers (and run their hooks) for automatic snapshots"),
    OptionSpec("replicate", _target, _BOTH,
               "send each automatic snapshot to another snapvol: " + targets.GRAMMAR),
    OptionSpec("standby", _targets, _BOTH,
               "keep standby copies on other snapvol hosts, which can take the volume over "
               "(snapvol handoff / promote, or a Mount there): TARGET[,TARGET]"),
    OptionSpec("sync", _schedule, _BOTH,
               "how often the standbys are brought up to date (default 1m): the most they lag"),
    OptionSpec("trash", _one_of("on", "off"), _BOTH,
               "off: docker volume rm destroys the volume at once instead of keeping it in "
               "the trash for SNAPVOL_TRASH_TTL"),
    OptionSpec("verify", _schedule, _BOTH,
               "verify the newest snapshot every interval (snapvol verify: a check "
               "container on a clone of it), e.g. 1d"),
    OptionSpec("verify-image", verify_spec.parse_image, _BOTH,
               "image of the check container (default: that of the container using the volume)"),
    OptionSpec("verify-cmd", verify_spec.parse_command, _BOTH,
               "command of the check container (words, never a shell string), or "
               "builtin:postgres, builtin:sha256sum [SUMFILE]"),
    OptionSpec("verify-path", verify_spec.parse_path, _BOTH,
               "where the clone is mounted in the check container (default: where the volume "
               f"is mounted in its container, else {verify_spec.DEFAULT_PATH})"),
    OptionSpec("verify-timeout", verify_spec.parse_timeout, _BOTH,
               f"the check is killed and fails after this long (default {verify_spec.DEFAULT_TIMEOUT})"),
    OptionSpec("verify-network", _one_of("none", "bridge"), _BOTH,
               "network of the check container (default none)"),
)}
# A clone keeps its source's data, owner and mode; only these may go with from=.
WITH_FROM = frozenset({"from", "size", "schedule", "keep", "quiesce", "replicate", "trash",
                       "verify", "verify-image", "verify-cmd", "verify-path", "verify-timeout",
                       "verify-network"})
# What a received volume keeps of its source's options: storage only (a replica takes no
# snapshots of its own, which would break the next incremental stream, and has no origin).
REPLICA_OPTIONS = ("size", "uid", "gid", "mode", "compression", "nocow", "recordsize", "atime")
# Only meaningful for automatic snapshots.
NEED_SCHEDULE = ("keep", "quiesce", "replicate")


def accepted(backend: str) -> list[str]:
    """Names of the options a volume of *backend* accepts, in documentation order."""
    return [name for name, spec in SPECS.items() if backend in spec.backends]


BTRFS_COMPRESSION = frozenset({"zstd", "lzo", "zlib", "none"})


def validate(raw: object, backend: str,
             compressions: Collection[str] = BTRFS_COMPRESSION) -> dict[str, str]:
    """Check Docker's ``Opts`` for a volume of *backend*; return them normalised.

    *compressions* are the algorithms this backend (and pool) supports.

    ``None`` (Docker sends ``null`` for volumes created implicitly by ``docker run``) means
    no options.

    :raises InvalidOption: not a map of strings, an unknown option, an option of the other
        backend, or a bad value; the message names the option and the accepted values.
    """
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidOption("Opts must be a map of option names to string values")
    unknown = sorted(k for k in raw if k not in SPECS)
    if unknown:
        shown = ", ".join(repr(k) if not isinstance(k, str) or len(k) < 40 else repr(k[:40] + "...")
                          for k in unknown[:5])
        raise InvalidOption(f"unknown option(s): {shown}; {backend} volumes accept: "
                            f"{', '.join(accepted(backend))}")
    result = {}
    for key, value in sorted(raw.items()):
        spec = SPECS[key]
        if backend not in spec.backends:
            only = "/".join(sorted(spec.backends))
            raise InvalidOption(f"option {key} is for {only} volumes only; this plugin "
                                f"stores volumes on {backend}")
        if not isinstance(value, str):
            raise InvalidOption(f"option {key}: the value must be a string, got {value!r:.40}")
        try:
            result[key] = spec.parse(value)
            if key == "compression" and value not in compressions:
                raise ValueError(_compression_help(backend, compressions))
        except ValueError as exc:
            raise InvalidOption(f"option {key}={value[:40]!r}: {exc}") from None
    if "from" in result and set(result) - WITH_FROM:
        extra = ", ".join(sorted(set(result) - WITH_FROM))
        raise InvalidOption(f"option(s) {extra} cannot be combined with from= (a clone keeps "
                            "its source's data, owner and mode; only size, schedule, keep, "
                            "quiesce, replicate, trash and verify* may be given)")
    if "sync" in result and "standby" not in result:
        raise InvalidOption("option sync applies to standby copies; give standby= too "
                            "(e.g. -o standby=ssh://nodeB -o sync=1m)")
    for key in NEED_SCHEDULE:
        if key in result and "schedule" not in result:
            raise InvalidOption(f"option {key} applies to automatic snapshots; give schedule= "
                                "too (e.g. -o schedule=1h)")
    return result


def _compression_help(backend: str, compressions: Collection[str]) -> str:
    shown = ", ".join(sorted(c for c in compressions if not c[-1].isdigit()))
    text = f"must be one of {shown}"
    if any(c[-1].isdigit() for c in compressions):
        text += " (or gzip-1..9" + (", zstd-1..19" if "zstd" in compressions else "") + ")"
    if backend == "zfs" and "lz4" not in compressions:
        text += "; this ZFS (zfs-fuse, pool version 23) has no lz4 or zstd"
    return text
