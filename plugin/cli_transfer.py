"""``snapvol send``, ``receive`` and ``replicate``: the commands that move a snapshot's data,
with progress on stderr (a terminal only) and the data on stdout or in a file.

``send`` checks the stream's frames and end mark as it passes (:mod:`plugin.stream`);
``receive`` hands stdin to the plugin's stream socket; ``replicate`` follows the plugin's
progress events until its result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, TextIO

from . import stream
from .cli_exit import Exit, exit_for
from .client import UnixHTTP10Connection, UnixHTTPConnection, kernel_mover, send_stream


class Progress:
    """Bytes, rate and ETA on stderr when it is a terminal (tqdm), silent otherwise."""

    def __init__(self, stderr: TextIO, label: str, total: int | None = None) -> None:
        self._bar = None
        if stderr.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                             desc=label, file=stderr, leave=True)
        self.done = 0

    def to(self, done: int) -> None:
        if self._bar is not None and done > self.done:
            self._bar.update(done - self.done)
        self.done = max(done, self.done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class _Tee:
    """A binary reader that copies what is read to *out* and reports progress."""

    def __init__(self, source: Any, out: Any, progress: Progress) -> None:
        self._source, self._out, self._progress, self.count = source, out, progress, 0

    def advance(self, moved: int) -> None:
        """*moved* bytes went to *out* by another way (see ``kernel_mover``)."""
        self.count += moved
        self._progress.to(self.count)

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self._out.write(data)
        self.count += len(data)
        self._progress.to(self.count)
        return data


def _error_reply(response: Any) -> tuple[int, str]:
    raw = response.read(1 << 20)
    try:
        return response.status, json.loads(raw).get("Err") or f"HTTP {response.status}"
    except ValueError:
        return response.status, f"HTTP {response.status}: {raw[:200]!r}"


def run_send(args: argparse.Namespace, socket_path: str, stdout: TextIO, stderr: TextIO) -> int:
    volume, at, snapshot = args.source.partition("@")
    body = {"Volume": volume, "Snapshot": snapshot if at else None, "Since": args.since}
    if args.compress:
        body["Compression"] = args.compress
    if args.format:
        body["Format"] = args.format
    conn = UnixHTTP10Connection(socket_path, timeout=300)
    conn.request("POST", "/Snapvol.Send", body=json.dumps(body))
    response = conn.getresponse()
    if response.status != 200 or response.getheader("Content-Type", "").startswith("application/vnd.docker"):
        status, message = _error_reply(response)
        print(f"snapvol: {message}", file=stderr)
        return exit_for(status) or Exit.ERROR
    sent = response.getheader("X-Snapvol-Snapshot", "?")
    out = open(args.output, "wb") if args.output else getattr(stdout, "buffer", stdout)
    progress = Progress(stderr, f"send {volume}@{sent}")
    tee = _Tee(response, out, progress)
    reader = stream.Reader(tee)
    try:
        reader.header()
        # into a pipe (| snapvol receive, | ssh): the kernel moves the data, this checks the
        # frames and the end mark (the receiver checks every CRC); into a file, all is read and
        # checked here, so a file that looks whole is whole (format 3: the native receiver checks data)
        move = None if args.output else kernel_mover(response.fp, out, 300, tee.advance)
        if move is not None:
            reader.relay(move)
        else:
            for _ in reader.data(hold_last=False):
                pass
    except (stream.StreamError, OSError) as exc:
        progress.close()
        if args.output:
            out.close()
            os.unlink(args.output)          # never leave a partial stream that looks whole
        print(f"snapvol: the stream of {volume}@{sent} is incomplete: {exc}", file=stderr)
        return Exit.ERROR
    finally:
        conn.close()
    progress.close()
    if args.output:
        out.close()
    else:
        out.flush()
    base = response.getheader("X-Snapvol-Base")
    print(f"sent {volume}@{sent}" + (f" (incremental from {base})" if base else " (full)")
          + f": {reader.bytes} bytes of snapshot data, {reader.wire_bytes} written", file=stderr)
    return Exit.OK


def run_receive(args: argparse.Namespace, socket_path: str, stdout: TextIO, stderr: TextIO) -> int:
    source = open(args.input, "rb") if args.input else sys.stdin.buffer
    total = os.fstat(source.fileno()).st_size if args.input else None
    progress = Progress(stderr, f"receive {args.volume}", total)
    try:
        # the plugin's stream socket: no HTTP body parsing in the way of the data
        reply = send_stream(socket_path + ".stream", args.volume, source, timeout=600,
                            progress=progress.to)
        status = int(reply.get("Status", 200))
    finally:
        progress.close()
        if args.input:
            source.close()
    if status >= 400 or reply.get("Err"):
        print(f"snapvol: {reply.get('Err') or f'HTTP {status}'}", file=stderr)
        return exit_for(status) or Exit.ERROR
    if args.json:
        print(json.dumps(reply, indent=2), file=stdout)
    else:
        base = reply.get("Base")
        print(f"received {args.volume}@{reply.get('Snapshot')}"
              + (f" (incremental from {base})" if base else " (full)")
              + f": {reply.get('Bytes')} bytes", file=stdout)
    return Exit.OK


def run_replicate(args: argparse.Namespace, socket_path: str, stdout: TextIO, stderr: TextIO) -> int:
    body = {"Volume": args.volume, "Target": args.target, "Snapshot": args.snapshot,
            "As": args.remote_name}
    if args.compress:
        body["Compression"] = args.compress
    conn = UnixHTTPConnection(socket_path, timeout=3600)
    progress = Progress(stderr, f"replicate {args.volume}")
    try:
        conn.request("POST", "/Snapvol.Replicate", body=json.dumps(body))
        response = conn.getresponse()
        if response.status != 200:
            status, message = _error_reply(response)
            print(f"snapvol: {message}", file=stderr)
            return exit_for(status) or Exit.ERROR
        final: dict[str, Any] = {}
        for line in response:
            event = json.loads(line)
            if "Err" in event:
                final = event
                break
            progress.to(int(event.get("Bytes", 0)))
    finally:
        progress.close()
        conn.close()
    if not final:
        print("snapvol: the plugin ended the replication without a result; see its log", file=stderr)
        return Exit.ERROR
    if final["Err"]:
        print(f"snapvol: {final['Err']}", file=stderr)
        return exit_for(int(final.get("Status", 500))) or Exit.ERROR
    run = final["Replication"]
    if args.json:
        print(json.dumps(final, indent=2), file=stdout)
    else:
        kind = f"incremental from {run['base']}" if run["base"] else "full"
        print(f"replicated {args.volume}@{run['snapshot']} to {run['target']} ({kind}): "
              f"{run['bytes']} bytes, {run['attempts']} attempt(s)", file=stdout)
    return Exit.OK
