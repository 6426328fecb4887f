"""Small JSON state files, replaced atomically (a crash leaves the old or the new file)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_json_atomically(path: Path, data: Any, *, durable: bool = True) -> None:
    """Replace *path* with *data* as JSON so a reader (or a crash) sees old or new, never half.

    With *durable* the file and the rename are fsynced, so they also survive a power loss;
    without it they survive a crash of the process (the page cache outlives it), at a
    fraction of the cost.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
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
    """The JSON content of *path*, or *default* if the file does not exist."""
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return default
