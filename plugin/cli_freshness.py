"""``snapvol check --freshness``: the facts asked from the plugin, judged by
:mod:`plugin.freshness`, printed for Nagios (stdout, one line per problem, its exit codes)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any, TextIO

from . import freshness


def run_freshness(args: argparse.Namespace, socket_path: str, stdout: TextIO, stderr: TextIO,
                  connect: Callable[[str], Any]) -> int:
    """``snapvol check --freshness``: Nagios exit codes (:class:`freshness.Level`); every
    failure to get an answer is UNKNOWN (3), with the reason on stdout where Nagios shows it."""
    def unknown(message: str) -> int:
        print(f"UNKNOWN: {message}", file=stdout)
        return freshness.Level.UNKNOWN

    if args.repair:
        return unknown("--freshness changes nothing: it cannot be combined with --repair")
    limits = freshness.Thresholds(args.warn_age, args.crit_age, args.warn_lag, args.crit_lag,
                                  args.warn_pool, args.crit_pool)
    try:
        limits.check()
    except ValueError as exc:
        return unknown(str(exc))
    try:
        status, reply = connect(socket_path).call("Snapvol.Freshness", {})
    except (OSError, ValueError) as exc:
        return unknown(f"cannot ask the plugin at {socket_path}: "
                       f"{getattr(exc, 'strerror', None) or exc}")
    if status != 200 or reply.get("Err"):
        return unknown(f"the plugin answered: {reply.get('Err') or f'HTTP {status}'}")
    facts = reply["Freshness"]
    findings = freshness.assess(facts, limits)
    level, lines = freshness.summary(facts, findings)
    if args.json:
        print(json.dumps({"Status": level.name, "Findings": [
            {"level": f.level.name, "kind": f.kind, "what": f.what} for f in findings],
            "Facts": facts}, indent=2), file=stdout)
    else:
        print("\n".join(lines), file=stdout)
    return level
