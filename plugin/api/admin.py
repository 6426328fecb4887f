"""Extension endpoints for the ``snapvol`` CLI, beside ``/VolumeDriver.*``, same envelope."""

from __future__ import annotations

from flask import Blueprint, Response

from .volume_driver import service
from .wire import docker_request, reply

bp = Blueprint("admin", __name__)


@bp.post("/Snapvol.Status")
def status() -> Response:
    docker_request()
    return reply(Status=service().describe())


@bp.post("/Snapvol.Volumes")
def volumes() -> Response:
    docker_request()
    return reply(Volumes=service().describe_volumes())
