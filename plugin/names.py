"""Validation of every name a client sends, and containment of every path built from one.

Volume names follow Docker's rule for local volumes (a letter or digit, then letters, digits,
``_``, ``.`` or ``-``) but may be a single character, as ``docker volume create -d snapvol x``
is what people type. The length cap keeps ``<root>/volumes/<name>`` and a future
``<dataset>/<volume>@<snapshot>`` far below filesystem limits (255 bytes per component).
"""

from __future__ import annotations

import functools
import os
import re
import stat
from pathlib import Path

from .errors import InvalidName

MAX_NAME = 100
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,%d}" % (MAX_NAME - 1))
# Docker's mount IDs are 64 hex digits; accept any short opaque token of safe characters.
_MOUNT_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def _shown(raw: object) -> str:
    """A short, printable rendering of a rejected value for error messages."""
    text = repr(raw)
    return text if len(text) <= 60 else text[:57] + "..."


# Volumes snapvol keeps for itself (the trash) have names with this prefix: the backends
# store them like any volume but never list them, and no client may name one.
INTERNAL_PREFIX = "snapvol."


def volume_name(raw: object) -> str:
    """Return *raw* if it is a valid volume name a client may use.

    :raises InvalidName: not a string, empty, too long, has characters outside the rule, or
        starts with :data:`INTERNAL_PREFIX`.
    """
    name = stored_volume_name(raw)
    if is_internal(name):
        raise InvalidName(f"invalid volume name {_shown(raw)}: names starting with "
                          f"{INTERNAL_PREFIX!r} are reserved for snapvol's own volumes")
    return name


def stored_volume_name(raw: object) -> str:
    """Return *raw* if it is a valid name for a volume in a backend: a client's
    (:func:`volume_name`) or one of snapvol's own (:func:`internal_name`).

    :raises InvalidName: not a string, empty, too long, or has characters outside the rule.
    """
    if not isinstance(raw, str) or not _NAME.fullmatch(raw):
        raise InvalidName(
            f"invalid volume name {_shown(raw)}: use 1-{MAX_NAME} characters from "
            "A-Z a-z 0-9 _ . -, starting with a letter or digit")
    return raw


def is_internal(name: str) -> bool:
    """Whether *name* is one of snapvol's own volumes (never listed, never a client's)."""
    return name.startswith(INTERNAL_PREFIX)


def internal_name(kind: str, token: str) -> str:
    """The name of one of snapvol's own volumes: ``snapvol.<kind>.<token>``."""
    return stored_volume_name(f"{INTERNAL_PREFIX}{kind}.{token}")


def snapshot_name(raw: object) -> str:
    """Return *raw* if it is a valid snapshot name (the volume-name rule).

    :raises InvalidName: as for volume names.
    """
    if not isinstance(raw, str) or not _NAME.fullmatch(raw):
        raise InvalidName(
            f"invalid snapshot name {_shown(raw)}: use 1-{MAX_NAME} characters from "
            "A-Z a-z 0-9 _ . -, starting with a letter or digit")
    return raw


def mount_id(raw: object) -> str:
    """Return *raw* if it looks like a Docker mount ID (an opaque token).

    :raises InvalidName: not a short token of letters, digits, ``_ . -``.
    """
    if not isinstance(raw, str) or not _MOUNT_ID.fullmatch(raw):
        raise InvalidName(f"invalid mount ID {_shown(raw)}: expected up to 128 characters "
                          "from A-Z a-z 0-9 _ . -")
    return raw


def under(root: Path, *parts: str) -> Path:
    """``root/parts...``, refusing anything that resolves outside *root* (symlinks included).

    Validation already forbids ``/`` and ``..`` in names; this is the second wall, as in
    moby's local driver: a symlink planted inside the root cannot redirect us elsewhere.

    :raises InvalidName: the path resolves to *root* itself or outside it.
    """
    path = root.joinpath(*parts)
    real_root = _real_root(root)
    inside = _inside_without_links(str(real_root), parts)
    if inside is None:                      # a symlink, or ``..``: resolve the whole path
        real = Path(os.path.realpath(path))
        inside = real != real_root and real.is_relative_to(real_root)
    if not inside:
        raise InvalidName(f"{path} resolves outside {root}")
    return path


def _inside_without_links(real_root: str, parts: tuple[str, ...]) -> bool | None:
    """Whether ``real_root/parts...`` names something strictly below *real_root*, walking
    only the components below it (the root is resolved once: :func:`_real_root`); None when
    a component is a symlink or ``..``, which :func:`os.path.realpath` must judge.

    Why: this runs on every Docker call (three times for a Get), and ``realpath`` walks every
    component from ``/`` with an ``lstat`` each: 18 a Get, a tenth of its time. A component
    that does not exist ends the walk: nothing below it can redirect anything."""
    current, below = real_root, False
    for part in parts:
        for piece in part.split("/"):
            if piece in ("", "."):
                continue
            if piece == "..":
                return None
            current, below = f"{current}/{piece}", True
            try:
                mode = os.lstat(current).st_mode
            except FileNotFoundError:
                return below
            except OSError:
                return None
            if stat.S_ISLNK(mode):
                return None
    return below


@functools.lru_cache(maxsize=32)
def _real_root(root: Path) -> Path:
    """The real path of a configured root. Roots are fixed directories, so resolving each
    once saves a walk of lstat calls on every Docker call; what lies below is always walked."""
    return Path(os.path.realpath(root))
