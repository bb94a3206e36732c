"""``/v1/files``: upload batch input files, list, retrieve, download and delete them."""

from __future__ import annotations

from flask import Blueprint, Response, g, request, send_file
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.formparser import FormDataParser

from api.accounts.guard import require_api_key
from api.extensions import services
from api.files import serving as file_serving
from api.files.store import UploadSpool
from api.http import errors
from api.http.common import respond
from api.protocol import ErrorResponse

bp = Blueprint("files", __name__, url_prefix="/v1")


@bp.post("/files")
@require_api_key
def create() -> Response:
    """Store a multipart upload (fields ``file`` and ``purpose``); its lines are checked first."""
    store = services().files
    with store.spool() as spool:  # removes the parts not stored, whatever ends the request
        form, uploads = parse_upload(spool)
        upload = uploads.get("file")
        return respond(file_serving.upload_file(
            store, g.principal, upload.filename if upload else None, form.get("purpose"),
            upload.stream if upload else None))


MAX_FORM_PARTS = 8  # a file and a purpose (and what SDKs add): not werkzeug's 1,000 open temp files


def parse_upload(spool: UploadSpool) -> tuple[MultiDict[str, str], MultiDict[str, FileStorage]]:
    """The request's form fields and file parts, each file part streamed into ``spool``.

    Not ``request.files``: werkzeug would keep a part in memory, then in the system temp dir,
    and the store would copy it again. The request's limits apply as they would there.
    """
    parser = FormDataParser(spool, max_form_memory_size=request.max_form_memory_size,
                            max_content_length=request.max_content_length,
                            max_form_parts=MAX_FORM_PARTS, cls=MultiDict)
    _, form, files = parser.parse(request.stream, request.mimetype, request.content_length,
                                  request.mimetype_params)
    return form, files


@bp.get("/files")
@require_api_key
def list_files() -> Response:
    """The caller's files, newest first (``limit`` 1-10000, ``after`` a file id, ``purpose``)."""
    limit = request.args.get("limit", file_serving.MAX_LIST_LIMIT, type=int)
    if not 1 <= limit <= file_serving.MAX_LIST_LIMIT:
        return respond(errors.invalid_request(
            f"limit must be between 1 and {file_serving.MAX_LIST_LIMIT}.", "limit"))
    return respond(file_serving.list_files(services().files, g.principal, limit, request.args.get("after"),
                                           request.args.get("purpose")))


@bp.get("/files/<file_id>")
@require_api_key
def get(file_id: str) -> Response:
    """One file's metadata."""
    return respond(file_serving.get_file(services().files, g.principal, file_id))


@bp.get("/files/<file_id>/content")
@require_api_key
def content(file_id: str) -> Response:
    """The file's bytes, streamed from disk."""
    found = file_serving.content_path(services().files, g.principal, file_id)
    if isinstance(found, ErrorResponse):
        return respond(found)
    info, path = found
    response = send_file(path, mimetype="application/octet-stream", as_attachment=True,
                         download_name=info.filename)
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.delete("/files/<file_id>")
@require_api_key
def delete(file_id: str) -> Response:
    """Delete the file: its row and its content."""
    return respond(file_serving.delete_file(services().files, g.principal, file_id))
