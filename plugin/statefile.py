"""Small JSON state files, replaced atomically (a crash leaves the old or the new file).

A state file that does not parse (truncated by a full disk or a power loss, hand-edited, not
UTF-8) never stops the plugin: :func:`read_json` moves it aside as
``<name>.corrupt-<UTC time>``, logs one error naming both files, and its caller starts from
what the filesystem shows. :func:`quarantined` lists such files for ``snapvol status``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CORRUPT = ".corrupt-"


def write_json_atomically(path: Path, data: Any, *, durable: bool = True,
                          indent: int | None = 1) -> None:
    """Replace *path* with *data* as JSON so a reader (or a crash) sees old or new, never half.

    With *durable* the file and the rename are fsynced, so they also survive a power loss;
    without it they survive a crash of the process (the page cache outlives it), at a
    fraction of the cost. ``indent=None`` writes one line, about ten times faster (only
    then does :mod:`json` use its C encoder): for files of thousands of entries.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=indent, sort_keys=True))
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if not durable:
        return
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def read_json(path: Path, default: Any) -> Any:
    """The JSON content of *path*; *default* if the file does not exist, or if it does not
    parse (then it is moved aside first, see the module's docstring)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return default
    try:
        return json.loads(raw.decode("utf-8"))
    except ValueError as exc:           # JSONDecodeError and UnicodeDecodeError both are
        aside = _move_aside(path)
        log.error("state file %s is damaged (%s); moved it aside to %s and started without it",
                  path, exc, aside.name)
        return default


def _aside_name(path: Path) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    aside, n = path.with_name(f"{path.name}{CORRUPT}{stamp}"), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}{CORRUPT}{stamp}-{n}")
    return aside


def _move_aside(path: Path) -> Path:
    aside = _aside_name(path)
    os.replace(path, aside)
    return aside


def copy_aside(path: Path) -> Path:
    """Keep a copy of the damaged state file *path* as ``<name>.corrupt-<UTC time>`` (for a
    file its owner repairs in place, such as the trash's journal); return the copy's path."""
    aside = _aside_name(path)
    aside.write_bytes(path.read_bytes())
    return aside


def quarantined(*directories: Path) -> list[Path]:
    """The damaged state files moved aside in *directories*, oldest name first."""
    return sorted(p for d in directories if d.is_dir() for p in d.glob(f"*{CORRUPT}*"))
