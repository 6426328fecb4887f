"""The exit statuses of ``snapvol``: what kind of failure happened, from the reply's HTTP status.

``snapvol verify`` and ``snapvol check --freshness`` have codes of their own
(:mod:`plugin.cli_verify`, :mod:`plugin.cli_freshness`).
"""

from __future__ import annotations

import enum


class Exit(enum.IntEnum):
    OK = 0
    ERROR = 1          # the plugin failed (5xx)
    USAGE = 2          # bad arguments (argparse's own code too), other 4xx
    NOT_FOUND = 3
    CONFLICT = 4       # in use, exists, busy
    UNREACHABLE = 5    # no socket, plugin not running


def exit_for(http_status: int) -> Exit:
    if http_status < 400:
        return Exit.OK
    if http_status == 404:
        return Exit.NOT_FOUND
    if http_status in (409, 503):
        return Exit.CONFLICT
    return Exit.USAGE if http_status < 500 else Exit.ERROR
