"""One tree of errors. Each class knows the HTTP status it maps to.

The message of a :class:`PluginError` is the sentence a user reads after
``docker volume create:`` or ``snapvol:``; it must be actionable and never contain a traceback.
Library exceptions (``OSError``, ``BtrfsUtilError``...) are translated into these at the
backend boundary and never leak upwards.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence


class PluginError(Exception):
    """Base class. The message is shown verbatim by ``docker volume ...``."""

    http_status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidRequest(PluginError):
    """The request itself is malformed (not JSON, wrong types, missing fields)."""

    http_status = 400


class InvalidName(InvalidRequest):
    """A volume, snapshot or mount ID that does not follow the naming rule."""


class InvalidOption(InvalidRequest):
    """An unknown volume option, an option of the other backend, or a bad value."""


class NotFound(PluginError):
    http_status = 404


class VolumeNotFound(NotFound):
    def __init__(self, name: str) -> None:
        super().__init__(f"no such volume: {name}")
        self.name = name


class SnapshotNotFound(NotFound):
    def __init__(self, volume: str, snapshot: str) -> None:
        super().__init__(f"no such snapshot: {volume}@{snapshot}")
        self.volume, self.snapshot = volume, snapshot


class Conflict(PluginError):
    http_status = 409


class VolumeExists(Conflict):
    pass


class VolumeInUse(Conflict):
    pass


class SnapshotExists(Conflict):
    pass


class VolumeBusy(PluginError):
    """Another operation holds the volume for longer than our bounded wait."""

    http_status = 503


class BackendUnavailable(PluginError):
    """The storage root is missing, not mounted, or not the expected filesystem."""

    http_status = 503


class BackendError(PluginError):
    """The filesystem refused an operation; the message carries its reason, and *errno* the
    system error number when the filesystem gave one (e.g. ``errno.ENOSPC``)."""

    http_status = 500

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class ConfigError(PluginError):
    """A setting (environment variable) has a bad value. Raised at start-up only."""


class AlreadyRunning(PluginError):
    """Another plugin process owns the state directory."""


class CommandFailed(BackendError):
    """An external program exited with an unexpected status."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr
        tail = stderr.strip().splitlines()[-3:]
        detail = "; ".join(tail) if tail else "no error output"
        super().__init__(f"{shlex.join(self.argv)} failed (exit {returncode}): {detail}")


class CommandTimeout(BackendError):
    """An external program did not finish in time and was killed."""

    def __init__(self, argv: Sequence[str], timeout: float) -> None:
        self.argv = tuple(argv)
        super().__init__(f"{shlex.join(self.argv)} timed out after {timeout:g} s and was killed")


class TransferFailed(PluginError):
    """A replication could not be completed (the target failed, hung or refused)."""

    http_status = 502
