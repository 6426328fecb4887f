"""The JSON envelope of Docker's plugin protocol: request decoding and ``{"Err": ...}`` replies.

dockerd sends no ``Content-Type`` (PROTOCOL.md section 1), so bodies are read raw and parsed
here; ``request.json`` would refuse them.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Response, current_app, request

from ..errors import InvalidRequest

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.docker.plugins.v1+json"
MAX_BODY = 64 * 1024        # Docker's bodies are a few hundred bytes; options stay small


def docker_request() -> dict[str, Any]:
    """The request body as a dict; an empty body (Activate, sometimes List) is ``{}``.

    :raises InvalidRequest: larger than MAX_BODY, not JSON, or not a JSON object.
    """
    raw = request.stream.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise InvalidRequest(f"request body is larger than {MAX_BODY} bytes")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    log.debug("%s keys=%s", request.path, sorted(body))
    return body


def required(body: dict[str, Any], field: str) -> Any:
    """``body[field]``, which must be present and not null.

    :raises InvalidRequest: the field is missing or null.
    """
    value = body.get(field)
    if value is None:
        raise InvalidRequest(f"missing field {field!r} in the request")
    return value


def reply(status: int = 200, **fields: Any) -> Response:
    """A protocol reply; ``Err`` is always present (empty on success)."""
    fields.setdefault("Err", "")
    return current_app.response_class(json.dumps(fields), status=status, content_type=CONTENT_TYPE)
