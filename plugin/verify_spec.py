"""What a validated restore runs: the check of a volume, from its options, the label of the
container that uses it, or the command line, and the built-in checks. Pure: no Docker here.

A check is a container: an image and a command (an argv, never a shell string), run with
the clone of a snapshot mounted at a path, no network unless asked, killed at its timeout.

* ``verify-cmd=builtin:postgres``: start PostgreSQL (of the check's image) on the clone
  and run ``pg_amcheck --all`` (with ``--install-missing``: it is a clone, writes are fine),
  plus a query in every database; any error fails the check.
* ``verify-cmd=builtin:sha256sum [SUMFILE]``: ``sha256sum -c SUMFILE`` (default
  ``SHA256SUMS``) in the mounted path.
* anything else: the argv (split like a shell splits words) run as ``docker run IMAGE ARGV``
  would, the image's entrypoint kept.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, replace
from pathlib import PurePosixPath

from .units import parse_duration

LABEL = "snapvol.verify"            # the label of a container that says how to check its volume
DEFAULT_PATH = "/data"
DEFAULT_TIMEOUT = "10m"
MAX_TIMEOUT = 24 * 3600
MAX_COMMAND = 4096
BUILTINS = ("builtin:postgres", "builtin:sha256sum")
_IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}")
_PATH_PART = re.compile(r"[A-Za-z0-9_.@+-]+")

# Ours, constant: user values reach it only as positional arguments ("$1"), never as text.
POSTGRES_SCRIPT = r"""set -u
export PGDATA="$1" PGHOST=/tmp PGUSER="${PGUSER:-postgres}"
rm -f "$PGDATA/postmaster.pid"
echo "snapvol verify: starting PostgreSQL on the clone (recovery runs first)"
if ! pg_ctl -D "$PGDATA" -w -t 600 -l /tmp/postgres.log \
     -o "-c listen_addresses= -c unix_socket_directories=/tmp -c archive_mode=off" start; then
  tail -n 20 /tmp/postgres.log; echo "snapvol verify: PostgreSQL does not start on this snapshot"
  exit 1
fi
status=0
if command -v pg_amcheck >/dev/null 2>&1; then
  echo "snapvol verify: pg_amcheck --all"
  pg_amcheck --all --install-missing --no-strict-names || status=1
fi
dbs=$(psql -qAt -v ON_ERROR_STOP=1 -c "SELECT datname FROM pg_database WHERE datallowconn") || status=1
for db in $dbs; do
  psql -qAt -v ON_ERROR_STOP=1 -d "$db" -c "SELECT count(*) FROM pg_class" >/dev/null || status=1
done
pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null || status=1
[ "$status" = 0 ] && echo "snapvol verify: PostgreSQL checks passed" || tail -n 20 /tmp/postgres.log
exit "$status"
"""


def parse_image(value: str) -> str:
    """:raises ValueError: not an image reference (``name[:tag][@digest]``)."""
    text = value.strip()
    if not _IMAGE.fullmatch(text):
        raise ValueError("must be an image reference such as postgres:16 or "
                         "registry.example/app@sha256:...")
    return text


def parse_command(value: str) -> str:
    """The words of a check command, validated; returned as given (stripped).

    :raises ValueError: empty, too long, quotes that do not close, or an unknown or
        badly used ``builtin:``.
    """
    text = value.strip()
    if len(text) > MAX_COMMAND:
        raise ValueError(f"must be at most {MAX_COMMAND} characters")
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ValueError(f"cannot be split into words ({exc})") from None
    if not words:
        raise ValueError("must not be empty")
    if words[0].startswith("builtin:"):
        if words[0] not in BUILTINS:
            raise ValueError(f"unknown builtin {words[0][:40]!r}; use one of {', '.join(BUILTINS)}")
        if words[0] == "builtin:postgres" and len(words) > 1:
            raise ValueError("builtin:postgres takes no arguments")
        if words[0] == "builtin:sha256sum":
            if len(words) > 2:
                raise ValueError("builtin:sha256sum takes at most one argument, the sum file")
            if len(words) == 2:
                relative_path(words[1])
    return text


def relative_path(value: str) -> str:
    """A path below the mounted clone (no ``..``, not absolute)."""
    path = PurePosixPath(value)
    if path.is_absolute() or not path.parts or not all(_PATH_PART.fullmatch(p) and p != ".."
                                                       for p in path.parts):
        raise ValueError(f"{value[:60]!r} must be a relative path inside the volume")
    return str(path)


def parse_path(value: str) -> str:
    """Where the clone is mounted in the check container: an absolute path, not ``/``."""
    path = PurePosixPath(value.strip())
    if (not path.is_absolute() or len(path.parts) < 2 or len(str(path)) > 255
            or not all(_PATH_PART.fullmatch(p) and p != ".." for p in path.parts[1:])):
        raise ValueError("must be an absolute path other than /, e.g. /var/lib/postgresql/data")
    return str(path)


def parse_timeout(value: str) -> str:
    seconds = parse_duration(value)
    if not 1 <= seconds <= MAX_TIMEOUT:
        raise ValueError("must be from 1s to 24h, e.g. 10m")
    return value.strip()


def parse_label(value: str) -> tuple[str | None, str | None]:
    """(image, command) of a ``snapvol.verify`` label: ``IMAGE[ CMD...]`` or a builtin
    (``builtin:...``, run in the container's own image: image None).

    :raises ValueError: not of that form.
    """
    try:
        words = shlex.split(value)
    except ValueError as exc:
        raise ValueError(f"label {LABEL} cannot be split into words ({exc})") from None
    if not words:
        raise ValueError(f"label {LABEL} is empty")
    if words[0].startswith("builtin:"):
        return None, parse_command(value)
    rest = shlex.join(words[1:])
    return parse_image(words[0]), parse_command(rest) if rest else None


@dataclass(frozen=True)
class CheckSpec:
    """A check, resolved: what runs, where the clone is mounted, for how long."""

    image: str | None = None            # None: the image of the container using the volume
    command: str | None = None          # None: the image's own command
    path: str | None = None             # None: where the volume is mounted in its container
    timeout: str | None = None          # None: DEFAULT_TIMEOUT
    network: str | None = None          # None: "none"

    @classmethod
    def from_options(cls, options: dict[str, str] | object) -> CheckSpec:
        opts = options if isinstance(options, dict) else dict(options)  # type: ignore[call-overload]
        return cls(image=opts.get("verify-image"), command=opts.get("verify-cmd"),
                   path=opts.get("verify-path"),
                   timeout=opts.get("verify-timeout"), network=opts.get("verify-network"))

    def over(self, lower: CheckSpec) -> CheckSpec:
        """This spec where it says something, else *lower*'s."""
        return replace(lower, **{k: v for k, v in self.__dict__.items() if v is not None})

    @property
    def timeout_seconds(self) -> int:
        return parse_duration(self.timeout or DEFAULT_TIMEOUT)

    @property
    def builtin(self) -> str | None:
        if self.command and self.command.split()[0] in BUILTINS:
            return self.command.split()[0]
        return None

    def container(self, path: str) -> tuple[list[str] | None, list[str] | None, str | None]:
        """(entrypoint, command, working dir) of the check container for the clone at *path*."""
        builtin = self.builtin
        words = shlex.split(self.command) if self.command else None
        if builtin == "builtin:postgres":
            return ["sh", "-c", POSTGRES_SCRIPT, "snapvol-verify", path], [], None
        if builtin == "builtin:sha256sum":
            assert words is not None
            return ["sha256sum", "-c", words[1] if len(words) > 1 else "SHA256SUMS"], [], path
        return None, words, None
