"""Serving logic for the Files API (``/v1/files``): upload, list, retrieve, content, delete.

Functions return a response model or an :class:`ErrorResponse`; another key's file
looks missing (404), never forbidden.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import IO

from api.accounts.auth import Principal
from api.files.store import FileStore, StoredFileInfo
from api.http import errors
from api.protocol import ErrorResponse, FileDeleted, FileList, FileObject

log = logging.getLogger(__name__)

MAX_LIST_LIMIT = 10_000


def upload_file(store: FileStore, principal: Principal, filename: str | None, purpose: str | None,
                stream: IO[bytes] | None) -> FileObject | ErrorResponse:
    """``POST /v1/files``: store the caller's upload (a batch input file)."""
    if stream is None:
        return errors.invalid_request("Missing required parameter: 'file' (send it as a multipart/form-data "
                                      "file field).", "file")
    if not purpose:
        return errors.invalid_request("Missing required parameter: 'purpose'.", "purpose")
    saved = store.save_upload(principal.key_id, filename or "file", purpose, stream)
    return saved if isinstance(saved, ErrorResponse) else file_object(saved)


def list_files(store: FileStore, principal: Principal, limit: int, after: str | None,
               purpose: str | None) -> FileList | ErrorResponse:
    """``GET /v1/files``: the caller's files, newest first, ``limit`` per page after ``after``."""
    page = store.list(principal.key_id, limit, after, purpose)
    if isinstance(page, ErrorResponse):
        return page
    data = [file_object(info) for info in page.data]
    return FileList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                    has_more=page.has_more)


def get_file(store: FileStore, principal: Principal, file_id: str) -> FileObject | ErrorResponse:
    """``GET /v1/files/{id}``."""
    info = store.get(principal.key_id, file_id)
    return file_object(info) if info is not None else _not_found(file_id)


def content_path(store: FileStore, principal: Principal,
                 file_id: str) -> tuple[StoredFileInfo, Path] | ErrorResponse:
    """``GET /v1/files/{id}/content``: the file and where its content is, for the router to send."""
    info = store.get(principal.key_id, file_id)
    if info is None:
        return _not_found(file_id)
    path = store.path_of(info)
    if not path.is_file():
        log.error("file %s has a row but no content at %s (is FILES_DIR shared by every API host?)",
                  file_id, path)
        return errors.error(500, "The file's content is not available on this server.", "server_error")
    return info, path


def delete_file(store: FileStore, principal: Principal, file_id: str) -> FileDeleted | ErrorResponse:
    """``DELETE /v1/files/{id}``: the row and the content go."""
    if not store.delete(principal.key_id, file_id):
        return _not_found(file_id)
    return FileDeleted(id=file_id, deleted=True)


def file_object(info: StoredFileInfo) -> FileObject:
    """The API's view of a stored file."""
    return FileObject(id=info.id, bytes=info.bytes, created_at=info.created_at, filename=info.filename,
                      purpose=info.purpose)


def _not_found(file_id: str) -> ErrorResponse:
    return errors.error(404, f"No file found with id '{file_id}'.", "invalid_request_error", "file_not_found",
                        "file_id")
