"""``snapvol``: the command line, a client of the plugin's socket (never of the storage).

Data goes to stdout (a table, or the reply as JSON with ``--json``); messages go to stderr.
The exit status says what kind of failure happened (:class:`~plugin.cli_exit.Exit`); the
commands that move data live in :mod:`plugin.cli_transfer`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from . import __version__, freshness
from .cli_exit import Exit, exit_for
from .cli_freshness import run_freshness
from .cli_transfer import run_receive, run_replicate, run_send
from .cli_verify import run_verify
from .client import PluginClient, find_socket
from .cli_render import (render_check, render_done, render_handoff, render_promote,
                         render_prune, render_purged, render_restored, render_role,
                         render_snapshots, render_status, render_sync, render_trash,
                         render_volumes)


def _add_common(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--socket", default=default,
                        help="plugin socket (default: $SNAPVOL_SOCKET, "
                        "/run/docker/plugins/snapvol.sock, or the managed plugin's)")
    parser.add_argument("--json", action="store_true",
                        default=False if default is None else default,
                        help="print the reply as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snapvol", description="Manage snapvol volumes through the running plugin.")
    parser.add_argument("--version", action="version", version=f"snapvol {__version__}")
    _add_common(parser, default=None)
    # Accepted after the command too; SUPPRESS keeps a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    _add_common(common, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ls = sub.add_parser("ls", parents=[common], help="list volumes with usage and mounts")
    ls.set_defaults(endpoint="Snapvol.Volumes", render=render_volumes)
    st = sub.add_parser("status", parents=[common], help="show the plugin and its storage")
    st.set_defaults(endpoint="Snapvol.Status", render=render_status)
    check = sub.add_parser("check", parents=[common], help="compare the state files with the "
                           "filesystem and the mount table (exit 0 consistent, 1 problems)")
    check.add_argument("--repair", action="store_true",
                       help="fix what is provably left over or stale; change nothing else")
    fresh = check.add_argument_group(
        "freshness", "--freshness checks instead whether snapshots, replicas and the pool are "
        "what the schedules promise, for Nagios and the like: exit 0 OK, 1 WARN, 2 CRIT, "
        "3 UNKNOWN (the plugin cannot be asked), one line per problem. Ages count in "
        "intervals of each volume's schedule (replicas: its schedule or standby sync=)")
    fresh.add_argument("--freshness", action="store_true",
                       help="judge freshness instead of consistency (changes nothing)")
    limits = freshness.Thresholds()
    for name, unit, what in (("age", "intervals", "a scheduled volume's newest snapshot is "
                              "older than"),
                             ("lag", "intervals", "a replica's (replicate=, standby) data is "
                              "older than"),
                             ("pool", "percent", "the pool is used to")):
        for level in ("warn", "crit"):
            default = getattr(limits, f"{level}_{name}")
            fresh.add_argument(f"--{level}-{name}", type=float, default=default, metavar="N",
                               help=f"{level.upper()} when {what} N {unit} (default {default:g})")
    check.set_defaults(endpoint="Snapvol.Check", render=render_check,
                       body=lambda a: {"Repair": a.repair},
                       outcome=lambda reply: Exit.ERROR if reply.get("Problems") else Exit.OK)

    snap = sub.add_parser("snapshot", help="create, list and remove snapshots")
    snap_sub = snap.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = snap_sub.add_parser("create", parents=[common],
                                 help="snapshot one or more volumes (one name, all or none)")
    create.add_argument("volumes", nargs="+", metavar="VOLUME")
    create.add_argument("--name", help="snapshot name (default: manual-<UTC time>)")
    create.add_argument("--quiesce", choices=("none", "pause"), default="none",
                        help="pause: pause the volumes' containers (running their "
                        "snapvol.pre/post-snapshot hooks) while the snapshot is taken")
    create.set_defaults(endpoint="Snapvol.SnapshotCreate", render=render_snapshots,
                        body=lambda a: {"Volumes": a.volumes, "Name": a.name,
                                        "Quiesce": a.quiesce})
    ls_snap = snap_sub.add_parser("ls", parents=[common], help="list a volume's snapshots")
    ls_snap.add_argument("volume", metavar="VOLUME")
    ls_snap.set_defaults(endpoint="Snapvol.SnapshotList", render=render_snapshots,
                         body=lambda a: {"Volume": a.volume})
    rm_snap = snap_sub.add_parser("rm", parents=[common], help="remove a snapshot")
    rm_snap.add_argument("volume", metavar="VOLUME")
    rm_snap.add_argument("snapshot", metavar="SNAPSHOT")
    rm_snap.set_defaults(endpoint="Snapvol.SnapshotRemove", render=render_done,
                         body=lambda a: {"Volume": a.volume, "Snapshot": a.snapshot})
    rollback = sub.add_parser("rollback", parents=[common],
                              help="make a volume what it was at a snapshot (not while in use)")
    rollback.add_argument("volume", metavar="VOLUME")
    rollback.add_argument("snapshot", metavar="SNAPSHOT")
    rollback.add_argument("--destroy-newer", action="store_true",
                          help="ZFS: allow destroying snapshots newer than SNAPSHOT")
    rollback.set_defaults(endpoint="Snapvol.Rollback", render=render_done,
                          body=lambda a: {"Volume": a.volume, "Snapshot": a.snapshot,
                                          "DestroyNewer": a.destroy_newer})
    prune = sub.add_parser("prune", parents=[common],
                           help="apply the retention (keep=) of scheduled volumes to their "
                           "automatic snapshots, printing each decision and its reason")
    prune.add_argument("volume", nargs="?", metavar="VOLUME", help="only this volume")
    prune.add_argument("--dry-run", action="store_true", help="decide and print, delete nothing")
    prune.set_defaults(endpoint="Snapvol.Prune", render=render_prune,
                       body=lambda a: {"Volume": a.volume, "DryRun": a.dry_run})
    send = sub.add_parser("send", parents=[common],
                          help="write a volume's snapshot as a stream (full, or incremental "
                          "with --since) to stdout or a file")
    send.add_argument("source", metavar="VOLUME[@SNAPSHOT]",
                      help="without @SNAPSHOT, a snapshot is taken now")
    send.add_argument("--since", metavar="SNAPSHOT", help="incremental from this snapshot")
    send.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    send.add_argument("--compress", choices=("none", "zstd"), default=None,
                      help="compress the stream with zstd (for slow links, compressible data)")
    send.add_argument("--format", type=int, choices=(1, 2, 3), default=None, help="stream format: "
                      "3 when not compressed, else 2; 2 for a receiver reading 1 and 2 only, or whose "
                      "ZFS takes no format 3 (snapvol before it did), 1 for snapvol 0.2")
    send.set_defaults(run=run_send)
    recv = sub.add_parser("receive", parents=[common],
                          help="make a volume from a full stream, or update a replica with an "
                          "incremental one")
    recv.add_argument("volume", metavar="VOLUME")
    recv.add_argument("-i", "--input", metavar="FILE", help="read here instead of stdin")
    recv.set_defaults(run=run_receive)
    token = sub.add_parser("resume-token", parents=[common],
                           help="the token of an interrupted receive into VOLUME (OpenZFS), "
                           "which `replicate` uses to resume")
    token.add_argument("volume", metavar="VOLUME")
    token.set_defaults(endpoint="Snapvol.ResumeToken", render=lambda r: r.get("Token") or "",
                       body=lambda a: {"Volume": a.volume})
    repl = sub.add_parser("replicate", parents=[common],
                          help="bring another snapvol's copy of a volume up to date "
                          "(incremental from the newest common snapshot)")
    repl.add_argument("volume", metavar="VOLUME")
    repl.add_argument("target", metavar="TARGET",
                      help="ssh://[user@]host[:port][/remote/plugin.sock] or unix:///path/plugin.sock")
    repl.add_argument("--snapshot", help="send this snapshot (default: one taken now)")
    repl.add_argument("--as", dest="remote_name", metavar="NAME",
                      help="the volume's name on the target (default: the same name)")
    repl.add_argument("--compress", choices=("none", "zstd"), default=None,
                      help="compress the stream with zstd (default: SNAPVOL_STREAM_COMPRESSION)")
    repl.set_defaults(run=run_replicate)

    role = sub.add_parser("role", parents=[common],
                          help="a volume's standby role here: primary or standby, epoch, and "
                          "each standby's last synced snapshot and lag")
    role.add_argument("volume", metavar="VOLUME")
    role.set_defaults(endpoint="Snapvol.Role", render=render_role,
                      body=lambda a: {"Volume": a.volume})
    sync = sub.add_parser("sync", parents=[common],
                          help="bring a primary's standbys up to date now")
    sync.add_argument("volume", metavar="VOLUME")
    sync.set_defaults(endpoint="Snapvol.Sync", render=render_sync,
                      body=lambda a: {"Volume": a.volume},
                      outcome=lambda r: Exit.ERROR if any((r.get("Results") or {}).values()) else Exit.OK)
    handoff = sub.add_parser("handoff", parents=[common],
                             help="planned move: hand a primary volume to its standby TARGET "
                             "(waits for its containers to stop; loses nothing)")
    handoff.add_argument("volume", metavar="VOLUME")
    handoff.add_argument("target", metavar="TARGET", help="the standby's ssh:// or unix:// address")
    handoff.set_defaults(endpoint="Snapvol.Handoff", render=render_handoff,
                         body=lambda a: {"Volume": a.volume, "Target": a.target})
    promote = sub.add_parser("promote", parents=[common],
                             help="failover: make a standby primary here, serving its last "
                             "synced snapshot (refused while the primary still serves it)")
    promote.add_argument("volume", metavar="VOLUME")
    promote.add_argument("--force", action="store_true",
                         help="promote even though the primary answers (or unfence a primary "
                         "whose hand-off is in doubt)")
    promote.set_defaults(endpoint="Snapvol.Promote", render=render_promote,
                         body=lambda a: {"Volume": a.volume, "Force": a.force})
    trash = sub.add_parser("trash", help="what docker volume rm kept: list, restore, purge")
    trash_sub = trash.add_subparsers(dest="action", required=True, metavar="ACTION")
    trash_ls = trash_sub.add_parser("ls", parents=[common],
                                    help="list trashed volumes, oldest first")
    trash_ls.set_defaults(endpoint="Snapvol.TrashList", render=render_trash, body=lambda a: {})
    restore = trash_sub.add_parser("restore", parents=[common],
                                   help="bring a trashed volume back, with its snapshots")
    restore.add_argument("volume", metavar="NAME", help="the name it had (the newest of that "
                         "name), or its ID from snapvol trash ls")
    restore.add_argument("--as", dest="as_name", metavar="NEW",
                         help="restore it under this name (needed when its name is taken)")
    restore.set_defaults(endpoint="Snapvol.TrashRestore", render=render_restored,
                         body=lambda a: {"Volume": a.volume, "As": a.as_name})
    purge = trash_sub.add_parser("purge", parents=[common],
                                 help="destroy trashed volumes for good")
    which = purge.add_mutually_exclusive_group(required=True)
    which.add_argument("volume", nargs="?", metavar="NAME", help="the name it had, or its ID")
    which.add_argument("--all", action="store_true", help="everything in the trash")
    purge.set_defaults(endpoint="Snapvol.TrashPurge", render=render_purged,
                       body=lambda a: {"Volume": a.volume, "All": a.all})
    verify = sub.add_parser("verify", parents=[common],
                            help="validated restore: run a check container on a clone of a "
                            "snapshot (exit 0 passed, 1 failed, 2 could not run)")
    verify.add_argument("source", metavar="VOLUME[@SNAPSHOT]",
                        help="without @SNAPSHOT, the volume's newest snapshot")
    verify.add_argument("--image", help="check image (default: -o verify-image=, the "
                        "snapvol.verify label, the image of the container using the volume)")
    verify.add_argument("--cmd", help="check command (words, no shell), or builtin:postgres, "
                        "builtin:sha256sum [SUMFILE] (default: -o verify-cmd=, the label)")
    verify.add_argument("--path", help="where the clone is mounted in the check container "
                        "(default: -o verify-path=, where the volume is mounted, /data)")
    verify.add_argument("--timeout", help="kill the check and fail after this long, e.g. 10m "
                        "(default: -o verify-timeout=, 10m)")
    verify.set_defaults(run=run_verify)
    # how one snapvol calls another through ssh (replication, hand-off): not for people
    call = sub.add_parser("call", parents=[common], help=argparse.SUPPRESS)
    call.add_argument("endpoint", metavar="ENDPOINT")
    call.add_argument("body", metavar="JSON")
    call.set_defaults(run=run_call)
    return parser


def run_call(args: argparse.Namespace, socket_path: str, stdout: TextIO, stderr: TextIO) -> int:
    """``snapvol call ENDPOINT JSON``: one extension endpoint, the HTTP status and reply
    printed as JSON (exit 0 whenever the plugin answered; 5 when it cannot be reached)."""
    if not re.fullmatch(r"Snapvol\.[A-Za-z]{1,40}", args.endpoint):
        print("snapvol call: ENDPOINT must be Snapvol.<Name>", file=stderr)
        return Exit.USAGE
    try:
        body = json.loads(args.body)
    except ValueError as exc:
        print(f"snapvol call: JSON: {exc}", file=stderr)
        return Exit.USAGE
    try:
        status, reply = PluginClient(socket_path, timeout=300).call(args.endpoint, body)
    except OSError as exc:
        print(f"snapvol: cannot reach the plugin at {socket_path}: {exc.strerror or exc}",
              file=stderr)
        return Exit.UNREACHABLE
    print(json.dumps({"Status": status, "Reply": reply}), file=stdout)
    return Exit.OK


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None,
         stderr: TextIO | None = None, environ: Mapping[str, str] | None = None,
         connect: Callable[[str], PluginClient] = PluginClient) -> int:
    """Run the CLI; return the exit status (see :class:`Exit`)."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:          # --help, --version, usage errors
        return int(exc.code or 0)
    try:
        socket_path = args.socket or find_socket(os.environ if environ is None else environ)
    except LookupError as exc:
        print(f"snapvol: {exc}", file=stderr)
        return Exit.UNREACHABLE
    if getattr(args, "freshness", False):
        return run_freshness(args, socket_path, stdout, stderr, connect)
    if hasattr(args, "run"):
        try:
            return args.run(args, socket_path, stdout, stderr)
        except OSError as exc:
            print(f"snapvol: {exc.strerror or exc}", file=stderr)
            return Exit.UNREACHABLE if isinstance(exc, ConnectionError) or exc.errno == 2 else Exit.ERROR
    try:
        body = args.body(args) if hasattr(args, "body") else {}
        status, reply = connect(socket_path).call(args.endpoint, body)
    except OSError as exc:
        print(f"snapvol: cannot reach the plugin at {socket_path}: {exc.strerror or exc}",
              file=stderr)
        return Exit.UNREACHABLE
    except ValueError as exc:
        print(f"snapvol: {exc}", file=stderr)
        return Exit.ERROR
    if reply.get("Err") or status >= 400:
        print(f"snapvol: {reply.get('Err') or f'HTTP {status}'}", file=stderr)
        return exit_for(status) or Exit.ERROR
    print(json.dumps(reply, indent=2) if args.json else args.render(reply), file=stdout)
    return args.outcome(reply) if hasattr(args, "outcome") else Exit.OK


def entry_point() -> None:
    sys.exit(main())
