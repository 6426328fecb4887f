"""Extension endpoints for the ``snapvol`` CLI, beside ``/VolumeDriver.*``, same envelope."""

from __future__ import annotations

from flask import Blueprint, Response

from .volume_driver import service

from ..errors import InvalidRequest
from ..volumes import SnapshotInfo, rfc3339
from .wire import docker_request, reply, required


def _snapshot(info: SnapshotInfo) -> dict[str, object]:
    return {"volume": info.volume, "name": info.name, "created": rfc3339(info.created),
            "identity": info.identity}

bp = Blueprint("admin", __name__)


@bp.post("/Snapvol.Status")
def status() -> Response:
    docker_request()
    return reply(Status=service().describe())


@bp.post("/Snapvol.Volumes")
def volumes() -> Response:
    docker_request()
    return reply(Volumes=service().describe_volumes())


@bp.post("/Snapvol.SnapshotCreate")
def snapshot_create() -> Response:
    body = docker_request()
    taken = service().snapshot(required(body, "Volumes"), body.get("Name"),
                               body.get("Quiesce") or "none")
    return reply(Snapshots=[_snapshot(s) for s in taken])


@bp.post("/Snapvol.SnapshotList")
def snapshot_list() -> Response:
    return reply(Snapshots=[_snapshot(s) for s in service().snapshots(required(docker_request(), "Volume"))])


@bp.post("/Snapvol.SnapshotRemove")
def snapshot_remove() -> Response:
    body = docker_request()
    service().remove_snapshot(required(body, "Volume"), required(body, "Snapshot"))
    return reply()


@bp.post("/Snapvol.Rollback")
def rollback() -> Response:
    body = docker_request()
    destroy_newer = body.get("DestroyNewer", False)
    if not isinstance(destroy_newer, bool):
        raise InvalidRequest("DestroyNewer must be true or false")
    service().rollback(required(body, "Volume"), required(body, "Snapshot"),
                       destroy_newer=destroy_newer)
    return reply()


@bp.post("/Snapvol.Prune")
def prune() -> Response:
    body = docker_request()
    dry_run = body.get("DryRun", False)
    if not isinstance(dry_run, bool):
        raise InvalidRequest("DryRun must be true or false")
    decisions = service().prune(body.get("Volume"), dry_run=dry_run)
    return reply(Decisions=decisions, DryRun=dry_run)
