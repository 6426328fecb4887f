"""Stream compression for slow links: the native stream through Debian's ``zstd`` program.

Why the program and not a Python binding (``zstandard``): it runs beside the plugin, in a
process of its own, so compressing never holds the plugin's interpreter (Docker's calls go on
at full speed), it uses every core with ``-T0``, it is one Debian package (``zstd``) with no
Python dependency for the plugin or the CLI, and it fits the argv pipeline every transfer
already is (``btrfs send | zstd`` on the sender, ``zstd -d | btrfs receive`` on the receiver).

Off by default: on random (incompressible) data it only costs CPU, and on this 2-core machine
the uncompressed transfer already competes with the native pipe for both cores. It pays on a
link slower than zstd (a few hundred MB/s per core at level 3) carrying compressible data.
"""

from __future__ import annotations

from .errors import InvalidRequest

COMPRESSIONS = ("zstd",)
# level 3 (zstd's default): about 3x on text-like data at a few hundred MB/s per core;
# -T0: one worker per core; -q: no progress on stderr (it ends up in our error messages)
_COMPRESS = {"zstd": ["zstd", "-q", "-c", "-3", "-T0"]}
_DECOMPRESS = {"zstd": ["zstd", "-q", "-d", "-c"]}


def compression(raw: object) -> str | None:
    """A validated compression name (None or ``"none"``: no compression).

    :raises InvalidRequest: an unknown name.
    """
    if raw is None or raw == "none" or raw == "":
        return None
    if raw not in COMPRESSIONS:
        raise InvalidRequest(f"unknown stream compression {raw!r}: use "
                             + " or ".join(("none", *COMPRESSIONS)))
    return str(raw)


def compress_argv(name: str) -> list[str]:
    return list(_COMPRESS[name])


def decompress_argv(name: str) -> list[str]:
    return list(_DECOMPRESS[name])
