"""Extension endpoints for the ``snapvol`` CLI, beside ``/VolumeDriver.*``, same envelope."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

from flask import Blueprint, Response, current_app, request

from .volume_driver import domain

from .. import names
from ..compression import compression
from ..errors import InvalidRequest, PluginError, VolumeBusy
from ..history import Replication
from ..replication import Replicator
from ..standby import Standbys
from ..targets import Target
from ..trash import Trash
from ..status import snapshot_row
from ..units import rfc3339
from ..verify import Verifier
from ..verify_book import VerifyResult
from ..verify_spec import CheckSpec, parse_command, parse_image, parse_path, parse_timeout
from .wire import docker_request, reply, required

log = logging.getLogger(__name__)
STREAM_TYPE = "application/vnd.snapvol.stream"


bp = Blueprint("admin", __name__)


@bp.post("/Snapvol.Status")
def status() -> Response:
    docker_request()
    return reply(Status=domain().status.describe())


@bp.post("/Snapvol.Check")
def check() -> Response:
    body = docker_request()
    repair = body.get("Repair", False)
    if not isinstance(repair, bool):
        raise InvalidRequest("Repair must be true or false")
    result = domain().checker.check(repair=repair)
    return reply(Problems=result["problems"], Repaired=result["repaired"])


@bp.post("/Snapvol.Freshness")
def freshness() -> Response:
    """The facts ``snapvol check --freshness`` judges (read now, not from the metrics'
    cache): per volume its newest snapshot, schedule and replication targets; the pool."""
    docker_request()
    return reply(Freshness=current_app.extensions["snapvol.observer"].facts(max_age=0).to_json())


@bp.post("/Snapvol.Volumes")
def volumes() -> Response:
    docker_request()
    return reply(Volumes=domain().status.describe_volumes())


@bp.post("/Snapvol.SnapshotCreate")
def snapshot_create() -> Response:
    body = docker_request()
    taken = domain().volumes.snapshot(required(body, "Volumes"), body.get("Name"),
                               body.get("Quiesce") or "none")
    return reply(Snapshots=[snapshot_row(s) for s in taken])


@bp.post("/Snapvol.SnapshotList")
def snapshot_list() -> Response:
    return reply(Snapshots=domain().status.snapshots(required(docker_request(), "Volume")))


@bp.post("/Snapvol.SnapshotRemove")
def snapshot_remove() -> Response:
    body = docker_request()
    domain().volumes.remove_snapshot(required(body, "Volume"), required(body, "Snapshot"))
    return reply()


@bp.post("/Snapvol.Rollback")
def rollback() -> Response:
    body = docker_request()
    destroy_newer = body.get("DestroyNewer", False)
    if not isinstance(destroy_newer, bool):
        raise InvalidRequest("DestroyNewer must be true or false")
    domain().volumes.rollback(required(body, "Volume"), required(body, "Snapshot"),
                       destroy_newer=destroy_newer)
    return reply()


@bp.post("/Snapvol.Prune")
def prune() -> Response:
    body = docker_request()
    dry_run = body.get("DryRun", False)
    if not isinstance(dry_run, bool):
        raise InvalidRequest("DryRun must be true or false")
    decisions = domain().schedules.prune(body.get("Volume"), dry_run=dry_run)
    return reply(Decisions=decisions, DryRun=dry_run)


@bp.post("/Snapvol.Send")
def send() -> Response:
    """The framed stream of a snapshot as the response body; errors found before the stream
    starts are JSON replies, later ones end the stream with an abort frame.

    To an HTTP/1.0 request (snapvol's CLI makes those) the body is the stream as it is, not
    chunked, and the connection ends with it: then, under gunicorn, the stream writes its
    data into the client's socket itself (``Transfer.into``: by splice(2) for format 3)."""
    body = docker_request()
    transfer = domain().transfers.send(required(body, "Volume"), body.get("Snapshot"), body.get("Since"),
                                       compression=body.get("Compression"), format=body.get("Format"))
    headers = {"X-Snapvol-Snapshot": transfer.header["snapshot"],
               "X-Snapvol-Base": transfer.header["base"] or ""}
    sock = request.environ.get("gunicorn.socket")
    if sock is not None and request.environ.get("SERVER_PROTOCOL") == "HTTP/1.0":
        return Response(transfer.into(sock), mimetype=STREAM_TYPE, headers=headers)
    return Response(transfer, mimetype=STREAM_TYPE, headers=headers)


@bp.post("/Snapvol.Receive")
def receive() -> Response:
    """The request body is a stream from ``/Snapvol.Send``; ``?Volume=`` names the volume.

    The portable way (any HTTP client, e.g. curl); snapvol's own clients use the plugin's
    stream socket, which skips gunicorn's body parsing (``api/stream_socket.py``)."""
    volume = request.args.get("Volume")
    if volume is None:
        raise InvalidRequest("missing query parameter Volume")
    result = domain().transfers.receive(volume, request.stream)
    return reply(Snapshot=result["snapshot"], Base=result["base"], Bytes=result["bytes"])


@bp.post("/Snapvol.ResumeToken")
def resume_token() -> Response:
    """The state of an interrupted receive into a volume (OpenZFS), for the sender to resume."""
    return reply(Token=domain().transfers.resume_token(required(docker_request(), "Volume")))


def _replication(run: Replication) -> dict[str, object]:
    return {"target": run.target, "snapshot": run.snapshot, "base": run.base,
            "bytes": run.bytes, "attempts": run.attempts, "at": rfc3339(run.at)}


@bp.post("/Snapvol.Replicate")
def replicate() -> Response:
    """Checks the request, then streams progress as JSON lines (``{"Bytes": n}``) while the
    replication runs, and ends with ``{"Err": "", "Replication": {...}}`` or ``{"Err": ...}``."""
    body = docker_request()
    replicator: Replicator | None = current_app.extensions.get("snapvol.replicator")
    if replicator is None:
        raise VolumeBusy("this plugin instance cannot replicate (no replication state)")
    volume, target = required(body, "Volume"), required(body, "Target")
    domain().volumes.snapshots(volume)                     # a missing volume: 404 now, not mid-stream
    if body.get("As") is not None:
        names.volume_name(body["As"])
    compression(body.get("Compression"))                  # an unknown one: 400 now
    try:
        Target.parse(target)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    events: queue.Queue[dict[str, object]] = queue.Queue()
    last = [0.0]

    def progress(sent: int) -> None:
        # called for every frame: wake the thread that writes the lines only as often as
        # it writes one (each wake-up is a context switch, on a machine the transfer keeps busy)
        if time.monotonic() - last[0] >= 0.5:
            last[0] = time.monotonic()
            events.put({"Bytes": sent})

    def replicated() -> dict[str, object]:
        run = replicator.replicate(volume, target, body.get("Snapshot"), progress=progress,
                                   remote_name=body.get("As"),
                                   compression=body.get("Compression"))
        return {"Replication": _replication(run)}

    return _event_lines(events, replicated, thread="snapvol-replicate",
                        what=f"replication of {volume}")


def _event_lines(events: queue.Queue[dict[str, object]], work: Callable[[], dict[str, object]],
                 *, thread: str, what: str) -> Response:
    """Run *work* in the thread named *thread* and reply with *events* as JSON lines, as
    they come, up to the last: ``{"Err": "", **work()}``, or ``{"Err": ..., "Status": n}``
    when it raised (*what* names it in the log when that is a bug of ours)."""
    def run() -> None:
        try:
            events.put({"Err": "", **work()})
        except PluginError as exc:
            events.put({"Err": str(exc), "Status": exc.http_status})
        except Exception:   # our bug: the traceback stays in the log
            log.exception("%s failed", what)
            events.put({"Err": "internal error in snapvol; see the plugin log", "Status": 500})

    threading.Thread(target=run, name=thread, daemon=True).start()

    def lines() -> Iterator[bytes]:
        while True:
            event = events.get()
            yield json.dumps(event).encode() + b"\n"
            if "Err" in event:
                return

    return Response(lines(), mimetype="application/x-ndjson")


# ---------------------------------------------------------------------- standby roles


def _standbys() -> Standbys:
    standbys: Standbys | None = current_app.extensions.get("snapvol.standbys")
    if standbys is None:
        raise VolumeBusy("this plugin instance has no standby roles (no replication state)")
    return standbys


@bp.post("/Snapvol.Role")
def role() -> Response:
    """A volume's role here: Role (primary, standby, or none for an ordinary volume), Epoch,
    Primary, Fenced (404: neither a volume nor a role of that name here). Peers ask this
    before they sync, hand off or promote."""
    volume = names.volume_name(required(docker_request(), "Volume"))
    standbys = _standbys()
    described = standbys.describe(volume)
    if described is None:
        domain().volumes.path(volume)            # 404 when there is no such volume either
        described = {"role": "none", "epoch": 0}
    return reply(Role=described["role"], Epoch=described["epoch"],
                 Primary=described.get("primary"), Fenced=described.get("fenced"),
                 Detail=described)


@bp.post("/Snapvol.Promote")
def promote() -> Response:
    """Make a standby primary here: by hand (failover; ``Force`` also when the primary still
    answers) or as the last step of a hand-off (``Epoch``, ``Snapshot``, ``Standbys``, ``Sync``)."""
    body = docker_request()
    force = body.get("Force", False)
    if not isinstance(force, bool):
        raise InvalidRequest("Force must be true or false")
    answer = _standbys().promote(required(body, "Volume"), epoch=body.get("Epoch"),
                                 snapshot=body.get("Snapshot"), standbys=body.get("Standbys"),
                                 sync=body.get("Sync"), force=force)
    return reply(Promoted=answer)


@bp.post("/Snapvol.Handoff")
def handoff() -> Response:
    """Hand a primary volume to a standby of it (run on the primary); returns when the
    target is primary and this host its standby."""
    body = docker_request()
    wait = body.get("Wait", 30.0)
    if not isinstance(wait, (int, float)) or isinstance(wait, bool) or not 0 <= wait <= 600:
        raise InvalidRequest("Wait must be a number of seconds from 0 to 600")
    answer = _standbys().handoff(required(body, "Volume"), required(body, "Target"),
                                 wait=float(wait))
    return reply(Handoff=answer)


@bp.post("/Snapvol.Sync")
def sync() -> Response:
    """Sync a primary's standbys now; ``Results`` maps each standby to its error (or null)."""
    volume = names.volume_name(required(docker_request(), "Volume"))
    standbys = _standbys()
    role = standbys.role(volume)
    if role is None or not role.is_primary or not role.standbys:
        domain().volumes.path(volume)
        raise InvalidRequest(f"volume {volume} is not a primary with standbys here")
    return reply(Results=standbys.sync(volume, wait=50.0))


# ---------------------------------------------------------------------------- the trash

def _trash() -> Trash:
    trash = domain().trash
    if trash is None:
        raise InvalidRequest("this plugin instance has no trash (no state directory)")
    return trash


@bp.post("/Snapvol.TrashList")
def trash_list() -> Response:
    """What ``docker volume rm`` kept: Trash (oldest first), with the TTL and fill threshold."""
    docker_request()
    trash = _trash()
    return reply(Trash=[trash.describe(e) for e in trash.entries()], TtlSeconds=trash.ttl,
                 FullPercent=trash.full_percent)


@bp.post("/Snapvol.TrashRestore")
def trash_restore() -> Response:
    """Bring ``Volume`` (a name it had, or its trash id) back, as ``As`` if given."""
    body = docker_request()
    restored = _trash().restore(required(body, "Volume"), body.get("As"))
    return reply(Restored=restored)


@bp.post("/Snapvol.TrashPurge")
def trash_purge() -> Response:
    """Destroy ``Volume`` (a name it had, or its trash id) for good, or everything (``All``)."""
    body = docker_request()
    purge_all = body.get("All", False)
    if not isinstance(purge_all, bool):
        raise InvalidRequest("All must be true or false")
    trash = _trash()
    if purge_all:
        purged = trash.purge_all()
    else:
        purged = [trash.purge(required(body, "Volume"))]
    return reply(Purged=[{"Id": e.id, "Name": e.name} for e in purged])


# ------------------------------------------------------------------ validated restores

def _verify_row(result: VerifyResult) -> dict[str, object]:
    return {**result.to_json(), "message": result.message[-4000:]}


def _override(body: dict[str, object], field: str, parse: Callable[[str], str]) -> str | None:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"{field} must be a string")
    try:
        return parse(value)
    except ValueError as exc:
        raise InvalidRequest(f"{field.lower()} {value[:60]!r}: {exc}") from None


@bp.post("/Snapvol.Verify")
def verify() -> Response:
    """Verify ``Volume``'s ``Snapshot`` (its newest if null) with the check its options say,
    or ``Image``/``Cmd``/``Path``/``Timeout``. Streams JSON lines: ``{"Step": text}`` while
    it runs, then ``{"Err": "", "Verify": result}`` or ``{"Err": ..., "Status": n}``; a
    request that is wrong from the start is an ordinary error reply."""
    body = docker_request()
    verifier: Verifier | None = domain().verifier
    if verifier is None:
        raise VolumeBusy("this plugin instance cannot verify (no state directory)")
    overrides = CheckSpec(image=_override(body, "Image", parse_image),
                          command=_override(body, "Cmd", parse_command),
                          path=_override(body, "Path", parse_path),
                          timeout=_override(body, "Timeout", parse_timeout))
    volume, snapshot = names.volume_name(required(body, "Volume")), body.get("Snapshot")
    domain().volumes.snapshots(volume)              # a missing volume: 404 now, not mid-stream
    if snapshot is not None:
        names.snapshot_name(snapshot)
    events: queue.Queue[dict[str, object]] = queue.Queue()

    def verified() -> dict[str, object]:
        result = verifier.verify(volume, snapshot, overrides,
                                 progress=lambda step: events.put({"Step": step}))
        return {"Verify": _verify_row(result)}

    return _event_lines(events, verified, thread="snapvol-verify",
                        what=f"verification of {volume}")
