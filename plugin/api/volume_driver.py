"""``/Plugin.Activate`` and ``/VolumeDriver.*``: Docker's volume plugin protocol."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app

from ..volumes import VolumeService, VolumeView, rfc3339
from .wire import docker_request, reply, required

bp = Blueprint("volume_driver", __name__)


def service() -> VolumeService:
    return current_app.extensions["snapvol.service"]


def _volume(view: VolumeView, *, with_status: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"Name": view.name}
    if view.mountpoint is not None:
        out["Mountpoint"] = str(view.mountpoint)
    if view.created is not None:          # omitted rather than anything but RFC 3339
        out["CreatedAt"] = rfc3339(view.created)
    if with_status:
        out["Status"] = view.status
    return out


@bp.post("/Plugin.Activate")
def activate() -> Response:
    return reply(Implements=["VolumeDriver"])


@bp.post("/VolumeDriver.Capabilities")
def capabilities() -> Response:
    docker_request()
    return reply(Capabilities={"Scope": "local"})


@bp.post("/VolumeDriver.Create")
def create() -> Response:
    body = docker_request()
    service().create(required(body, "Name"), body.get("Opts"))
    return reply()


@bp.post("/VolumeDriver.Remove")
def remove() -> Response:
    service().remove(required(docker_request(), "Name"))
    return reply()


@bp.post("/VolumeDriver.Mount")
def mount() -> Response:
    body = docker_request()
    path = service().mount(required(body, "Name"), required(body, "ID"))
    return reply(Mountpoint=str(path))


@bp.post("/VolumeDriver.Unmount")
def unmount() -> Response:
    body = docker_request()
    service().unmount(required(body, "Name"), required(body, "ID"))
    return reply()


@bp.post("/VolumeDriver.Path")
def path() -> Response:
    return reply(Mountpoint=str(service().path(required(docker_request(), "Name"))))


@bp.post("/VolumeDriver.Get")
def get() -> Response:
    view = service().get(required(docker_request(), "Name"))
    return reply(Volume=_volume(view, with_status=True))


@bp.post("/VolumeDriver.List")
def list_volumes() -> Response:
    docker_request()
    return reply(Volumes=[_volume(v, with_status=False) for v in service().list()])
