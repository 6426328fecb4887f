"""``snapvol verify``: the plugin's steps on stderr (on a terminal), the result on stdout,
and exit codes of its own: 0 passed, 1 failed, 2 could not run."""

from __future__ import annotations

import argparse
import json
from typing import Any, TextIO

from .client import UnixHTTPConnection
from .cli_render import render_verify


def _error_text(response: Any) -> str:
    raw = response.read(1 << 20)
    try:
        return json.loads(raw).get("Err") or f"HTTP {response.status}"
    except ValueError:
        return f"HTTP {response.status}: {raw[:200]!r}"


# snapvol verify's own exit codes, as the issue asks: the result, not the HTTP status
VERIFY_EXIT = {"passed": 0, "failed": 1}
VERIFY_COULD_NOT_RUN = 2


def run_verify(args: argparse.Namespace, socket_path: str, stdout: TextIO, stderr: TextIO) -> int:
    """``snapvol verify``: steps on stderr (a terminal only), the result on stdout."""
    volume, at, snapshot = args.source.partition("@")
    body = {"Volume": volume, "Snapshot": snapshot if at else None, "Image": args.image,
            "Cmd": args.cmd, "Path": args.path, "Timeout": args.timeout}
    conn = UnixHTTPConnection(socket_path, timeout=26 * 3600)   # a check may take hours
    final: dict[str, Any] = {}
    try:
        try:
            conn.request("POST", "/Snapvol.Verify", body=json.dumps(body))
            response = conn.getresponse()
        except OSError as exc:
            print(f"snapvol: cannot reach the plugin at {socket_path}: {exc.strerror or exc}",
                  file=stderr)
            return VERIFY_COULD_NOT_RUN
        if response.status != 200 or not response.getheader("Content-Type", "").startswith(
                "application/x-ndjson"):
            print(f"snapvol: {_error_text(response)}", file=stderr)
            return VERIFY_COULD_NOT_RUN
        for line in response:
            event = json.loads(line)
            if "Err" in event:
                final = event
                break
            if stderr.isatty():
                print(f"snapvol verify {args.source}: {event.get('Step')}", file=stderr)
    finally:
        conn.close()
    if not final:
        print("snapvol: the plugin ended the verification without a result; see its log",
              file=stderr)
        return VERIFY_COULD_NOT_RUN
    if final["Err"]:
        print(f"snapvol: {final['Err']}", file=stderr)
        return VERIFY_COULD_NOT_RUN
    result = final["Verify"]
    print(json.dumps(final, indent=2) if args.json else render_verify(result), file=stdout)
    return VERIFY_EXIT.get(result.get("result"), VERIFY_COULD_NOT_RUN)


