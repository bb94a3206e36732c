"""``GET /openapi.json``: the API's OpenAPI 3.1 document (no key needed)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from api.extensions import services
from api.http.openapi import build_openapi

bp = Blueprint("openapi", __name__)


@bp.get("/openapi.json")
def openapi_document() -> Response:
    """The document built from the protocol models, for clients and schema-driven tests."""
    return jsonify(build_openapi(services().settings))
