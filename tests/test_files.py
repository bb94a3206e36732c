"""Files API (/v1/files): uploads checked line by line and streamed into FILES_DIR, per-key
isolation, content round trips, size limits. The real app in-process, no worker needed.
FileStore alone: test_file_store.py; the SDK against gunicorn: test_files_live.py."""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from api import create_app
from tests.conftest import TEST_KEY, add_key

CHAT = "/v1/chat/completions"


def request_line(custom_id: str = "req-1", url: str = CHAT, **overrides: object) -> dict[str, object]:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body, **overrides}


def jsonl(*lines: object) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def upload(client, content: bytes, headers: dict[str, str], purpose: str | None = "batch",
           filename: str = "in.jsonl"):
    data: dict[str, object] = {"file": (io.BytesIO(content), filename)}
    if purpose is not None:
        data["purpose"] = purpose
    return client.post("/v1/files", data=data, content_type="multipart/form-data", headers=headers)


def stored(files_dir: Path) -> list[str]:
    """Every entry in FILES_DIR, temporary files included."""
    return sorted(p.name for p in files_dir.iterdir()) if files_dir.exists() else []


@pytest.fixture
def files_dir(tmp_path: Path) -> Path:
    return tmp_path / "files"


@pytest.fixture
def app_config(app_config, files_dir):
    return {**app_config, "files_dir": str(files_dir)}


def client_with(app_config, **settings):
    flask_app = create_app({**app_config, **settings})
    flask_app.config["TESTING"] = True
    return flask_app.test_client()


# --- the API ------------------------------------------------------------------


def test_upload_retrieve_and_content_round_trip(client, auth, files_dir):
    content = (b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",\t'
               b'"body": {"x": "\xc3\xa9"}}\r\n\n' + jsonl(request_line("b")))  # CRLF, a blank line, UTF-8
    before = int(time.time())
    r = upload(client, content, auth)
    assert r.status_code == 200, r.json
    created = r.json
    assert created["id"].startswith("file-") and len(created["id"]) == 29
    assert created == {"id": created["id"], "object": "file", "bytes": len(content),
                       "created_at": created["created_at"], "filename": "in.jsonl", "purpose": "batch",
                       "status": "processed", "status_details": None}
    assert before <= created["created_at"] <= time.time()
    assert stored(files_dir) == [f"{created['id']}.jsonl"]

    assert client.get(f"/v1/files/{created['id']}", headers=auth).json == created
    r = client.get(f"/v1/files/{created['id']}/content", headers=auth)
    assert r.status_code == 200
    assert r.data == content
    assert r.mimetype == "application/octet-stream"
    assert r.headers["Cache-Control"] == "no-store"


def test_delete_removes_the_row_and_the_content(client, auth, files_dir):
    file_id = upload(client, jsonl(request_line()), auth).json["id"]
    r = client.delete(f"/v1/files/{file_id}", headers=auth)
    assert r.status_code == 200
    assert r.json == {"id": file_id, "object": "file", "deleted": True}
    assert stored(files_dir) == []
    for method, path in (("GET", f"/v1/files/{file_id}"), ("GET", f"/v1/files/{file_id}/content"),
                         ("DELETE", f"/v1/files/{file_id}")):
        r = client.open(path, method=method, headers=auth)
        assert r.status_code == 404
        assert r.json["error"]["code"] == "file_not_found"
        assert r.json["error"]["type"] == "invalid_request_error"
    assert client.get("/v1/files", headers=auth).json["data"] == []


def test_list_is_newest_first_and_paginates(app, client, auth):
    ids = [upload(client, jsonl(request_line(f"r{i}")), auth).json["id"] for i in range(3)]
    everything = client.get("/v1/files", headers=auth).json
    assert [f["id"] for f in everything["data"]] == ids[::-1]
    assert everything["object"] == "list" and everything["has_more"] is False
    assert (everything["first_id"], everything["last_id"]) == (ids[2], ids[0])

    first = client.get("/v1/files?limit=2", headers=auth).json
    assert [f["id"] for f in first["data"]] == [ids[2], ids[1]] and first["has_more"] is True
    rest = client.get(f"/v1/files?limit=2&after={first['last_id']}", headers=auth).json
    assert [f["id"] for f in rest["data"]] == [ids[0]] and rest["has_more"] is False

    svc = app.extensions["inferq"]
    output = svc.files.create_output(svc.keys.verify(TEST_KEY).key_id, "out.jsonl", ['{"a":1}'])
    outputs = client.get("/v1/files?purpose=batch_output", headers=auth).json["data"]
    assert [(f["id"], f["purpose"]) for f in outputs] == [(output.id, "batch_output")]
    assert len(client.get("/v1/files?purpose=batch", headers=auth).json["data"]) == 3


@pytest.mark.parametrize("query", ["limit=0", "limit=10001", "after=file-nope"])
def test_list_rejects_bad_parameters(client, auth, query):
    r = client.get(f"/v1/files?{query}", headers=auth)
    assert r.status_code == 400
    assert r.json["error"]["param"] == query.partition("=")[0]


def test_other_keys_files_look_missing(client, auth, app_config):
    file_id = upload(client, jsonl(request_line()), auth).json["id"]
    key, _ = add_key(app_config["database_url"])
    other = {"Authorization": f"Bearer {key}"}
    for method, path in (("GET", f"/v1/files/{file_id}"), ("GET", f"/v1/files/{file_id}/content"),
                         ("DELETE", f"/v1/files/{file_id}")):
        r = client.open(path, method=method, headers=other)
        assert r.status_code == 404 and r.json["error"]["code"] == "file_not_found"
    assert client.get("/v1/files", headers=other).json["data"] == []
    assert client.get(f"/v1/files?after={file_id}", headers=other).status_code == 400
    assert client.get(f"/v1/files/{file_id}", headers=auth).status_code == 200  # still there


def test_every_route_needs_a_key(client):
    for method, path in (("POST", "/v1/files"), ("GET", "/v1/files"), ("GET", "/v1/files/file-x"),
                         ("GET", "/v1/files/file-x/content"), ("DELETE", "/v1/files/file-x")):
        assert client.open(path, method=method).status_code == 401


BAD_FILES = [
    pytest.param(jsonl(request_line()) + b'{"custom_id": "req-2", "method": \n', "line 2: not valid JSON",
                 id="bad-json"),
    pytest.param(b"\xff\xfe\n", "line 1: not valid UTF-8", id="not-utf8"),
    pytest.param(b"[1, 2]\n", "line 1: each line must be a JSON object", id="not-an-object"),
    pytest.param(jsonl({k: v for k, v in request_line().items() if k != "custom_id"}),
                 "line 1: 'custom_id' must be a non-empty string", id="missing-custom-id"),
    pytest.param(jsonl(request_line(), request_line("")), "line 2: 'custom_id' must be a non-empty string",
                 id="empty-custom-id"),
    pytest.param(jsonl(request_line(custom_id=7)), "line 1: 'custom_id' must be a non-empty string",
                 id="numeric-custom-id"),
    pytest.param(jsonl(request_line("req-1"), request_line("req-2"), request_line("req-2")),
                 "line 3: duplicate custom_id 'req-2' (first on line 2)", id="duplicate-custom-id"),
    pytest.param(jsonl(request_line("a"), request_line("b", method="GET")), "line 2: 'method' must be 'POST'",
                 id="wrong-method"),
    pytest.param(jsonl(request_line(url="/v1/embeddings")), "line 1: 'url' must be '/v1/chat/completions'",
                 id="unsupported-url"),
    pytest.param(jsonl(request_line("a"), request_line("b", url="/v1/completions")),
                 "line 2: url '/v1/completions' differs from '/v1/chat/completions' on line 1",
                 id="mixed-urls"),
    pytest.param(jsonl(request_line(body=["hi"])), "line 1: 'body' must be a JSON object",
                 id="body-not-object"),
    pytest.param(b"\n  \n" + jsonl(request_line(body=None)), "line 3: 'body' must be a JSON object",
                 id="blank-lines-are-counted"),
    pytest.param(b"", "no requests", id="empty"),
    pytest.param(b"\n \r\n", "no requests", id="only-blank-lines"),
]


@pytest.mark.parametrize(("content", "message"), BAD_FILES)
def test_invalid_files_are_refused_naming_the_line(client, auth, files_dir, content, message):
    r = upload(client, content, auth)
    assert r.status_code == 400
    error = r.json["error"]
    assert message in error["message"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_file", "file")
    assert stored(files_dir) == []  # nothing kept, not even a temporary file
    assert client.get("/v1/files", headers=auth).json["data"] == []


def test_at_most_max_file_lines_requests(app_config, auth):
    client = client_with(app_config, max_file_lines=3)
    three = [request_line(f"r{i}") for i in range(3)]
    r = upload(client, b"\n" + jsonl(*three) + b"\n\n", auth)  # blank lines are not requests
    assert r.status_code == 200
    r = upload(client, jsonl(*three) + b"\n" + jsonl(request_line("r3")), auth)
    assert r.status_code == 400
    assert r.json["error"]["message"].startswith("line 5: the file holds more than 3 requests")


@pytest.mark.parametrize(("purpose", "message"), [
    (None, "Missing required parameter: 'purpose'"),
    ("", "Missing required parameter: 'purpose'"),
    ("fine-tune", "Invalid purpose 'fine-tune'"),
    ("batch_output", "Invalid purpose 'batch_output'"),
])
def test_purpose_must_be_batch(client, auth, files_dir, purpose, message):
    r = upload(client, jsonl(request_line()), auth, purpose=purpose)
    assert r.status_code == 400
    assert message in r.json["error"]["message"] and r.json["error"]["param"] == "purpose"
    assert stored(files_dir) == []


def test_file_field_is_required(client, auth):
    for r in (client.post("/v1/files", data={"purpose": "batch"}, content_type="multipart/form-data",
                          headers=auth),
              client.post("/v1/files", data={"purpose": "batch", "file": "not a file part"},
                          content_type="multipart/form-data", headers=auth),
              client.post("/v1/files", json={"purpose": "batch"}, headers=auth)):
        assert r.status_code == 400
        assert r.json["error"]["param"] == "file" and "'file'" in r.json["error"]["message"]


def test_oversize_uploads_get_413(app_config, auth, files_dir):
    client = client_with(app_config, max_file_bytes=2048)
    line = request_line(body={"model": "m", "prompt": "x" * 2000}, url="/v1/completions")
    just_over = jsonl(line)
    assert len(just_over) > 2048
    r = upload(client, just_over, auth)  # the body fits the upload limit; the store counts the file
    assert r.status_code == 413
    assert r.json["error"]["code"] == "file_too_large" and r.json["error"]["param"] == "file"
    assert "2048 bytes" in r.json["error"]["message"]

    r = upload(client, b"x" * 200_000, {})  # the declared length alone: before auth, nothing read
    assert r.status_code == 413
    assert set(r.json) == {"error"} and r.json["error"]["code"] == "file_too_large"
    assert r.json["error"]["type"] == "invalid_request_error"
    assert stored(files_dir) == []


def test_uploads_may_exceed_max_request_bytes_other_requests_may_not(app_config, auth):
    client = client_with(app_config, max_request_bytes=1024, max_file_bytes=64 * 1024)
    content = jsonl(*[request_line(f"r{i}") for i in range(40)])
    assert 1024 * 2 < len(content) < 64 * 1024
    r = upload(client, content, auth)
    assert r.status_code == 200 and r.json["bytes"] == len(content)
    r = client.post("/v1/chat/completions", data=content, content_type="application/json", headers=auth)
    assert r.status_code == 413 and r.json["error"]["code"] == "request_too_large"
    r = client.post("/v1/files/x", data=content, headers=auth)  # only the upload route has the upload limit
    assert r.status_code == 413


def test_body_without_length_is_cut_at_the_upload_limit(app_config, auth, files_dir):
    """A chunked upload declares no length: werkzeug stops reading at the request's limit."""
    client = client_with(app_config, max_file_bytes=2048)
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + b"x" * 200_000 + \
        f"\r\n--{boundary}--\r\n".encode()
    r = client.post("/v1/files", input_stream=io.BytesIO(body), headers=auth,
                    content_type=f"multipart/form-data; boundary={boundary}",
                    environ_overrides={"wsgi.input_terminated": True})
    assert r.status_code == 413
    assert set(r.json) == {"error"} and r.json["error"]["type"] == "invalid_request_error"
    assert stored(files_dir) == []  # the part spooled before the cut is gone


# --- uploads are streamed into FILES_DIR ------------------------------------------------

BOUNDARY = "inferq-test-boundary"


def big_lines(count: int, prompt_bytes: int = 1000) -> list[dict[str, object]]:
    return [request_line(f"r{i}", body={"model": "m", "prompt": "p" * prompt_bytes}) for i in range(count)]


def write_body(path: Path, lines: list[dict[str, object]], tail: bytes = b"") -> Path:
    """A multipart upload body in a file (so the client holds none of it in memory), the file
    part holding ``lines`` as JSONL, then ``tail``."""
    with path.open("wb") as out:
        out.write(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
                  f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
                  "Content-Type: application/octet-stream\r\n\r\n".encode())
        for line in lines:
            out.write(jsonl(line))
        out.write(tail + f"\r\n--{BOUNDARY}--\r\n".encode())
    return path


class Body(io.FileIO):
    """A request body read from disk that calls ``midway`` once, when the parser is halfway through."""

    def __init__(self, path: Path, midway: Callable[[], None] = lambda: None):
        super().__init__(path, "rb")
        self.half = path.stat().st_size // 2
        self.midway: Callable[[], None] | None = midway

    def read(self, size: int = -1) -> bytes:
        self._check()
        return super().read(size)

    def readinto(self, buffer) -> int:  # werkzeug's LimitedStream reads this way
        self._check()
        return super().readinto(buffer)

    def _check(self) -> None:
        if self.midway is not None and self.tell() >= self.half:
            self.midway, midway = None, self.midway
            midway()


def post_body(client, body: Body, headers: dict[str, str], content_length: int | None = None):
    size = os.fstat(body.fileno()).st_size
    return client.post("/v1/files", input_stream=body, headers=headers,
                       content_length=size if content_length is None else content_length,
                       content_type=f"multipart/form-data; boundary={BOUNDARY}")


def parts_in(files_dir: Path) -> dict[str, tuple[int, int]]:
    """The temporary files in FILES_DIR: name -> (inode, size)."""
    return {p.name: (p.stat().st_ino, p.stat().st_size) for p in files_dir.glob(".part-*")}


def test_upload_is_streamed_into_files_dir_and_renamed_never_via_the_system_temp_dir(
        client, auth, files_dir, tmp_path, monkeypatch):
    lines = big_lines(1000)  # about 1 MB: werkzeug's own parsing would spill it to the system temp dir
    path = write_body(tmp_path / "body", lines)
    seen: list[dict[str, tuple[int, int]]] = []
    # Any temporary file made without a directory now fails: the system temp dir does not exist.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-system-temp-dir"))
    with Body(path, lambda: seen.append(parts_in(files_dir))) as body:
        r = post_body(client, body, auth)
    assert r.status_code == 200, r.json
    assert r.json["bytes"] == len(jsonl(*lines))

    assert len(seen) == 1 and len(seen[0]) == 1  # halfway through, one part was being written
    [(inode, size_midway)] = seen[0].values()
    assert 0 < size_midway < r.json["bytes"]
    final = files_dir / f"{r.json['id']}.jsonl"
    assert stored(files_dir) == [final.name]
    assert final.stat().st_ino == inode  # that very file, renamed: the upload was written once
    assert final.read_bytes() == jsonl(*lines)


def test_rejected_upload_leaves_nothing_in_files_dir(client, auth, files_dir, tmp_path):
    path = write_body(tmp_path / "body", big_lines(1000), tail=b'{"custom_id": "late"\n')
    seen: list[dict[str, tuple[int, int]]] = []
    with Body(path, lambda: seen.append(parts_in(files_dir))) as body:
        r = post_body(client, body, auth)
    assert r.status_code == 400
    assert r.json["error"]["code"] == "invalid_file"
    assert r.json["error"]["message"].startswith("line 1001: not valid JSON")
    assert len(seen[0]) == 1  # spooled into FILES_DIR ...
    assert stored(files_dir) == []  # ... and removed once refused
    assert client.get("/v1/files", headers=auth).json["data"] == []


def test_upload_cut_off_by_its_client_leaves_nothing_in_files_dir(client, auth, files_dir, tmp_path):
    path = write_body(tmp_path / "body", big_lines(1000))
    declared = path.stat().st_size
    os.truncate(path, declared // 2)  # the client goes away halfway through the file part
    seen: list[dict[str, tuple[int, int]]] = []
    with Body(path, lambda: seen.append(parts_in(files_dir))) as body:
        r = post_body(client, body, auth, content_length=declared)
    assert r.status_code == 400
    assert len(seen[0]) == 1
    assert stored(files_dir) == []


def test_upload_memory_does_not_grow_with_the_file(client, auth, tmp_path):
    upload(client, jsonl(request_line()), auth)  # warm up: one-time allocations of the first upload
    lines = big_lines(18_000)
    path = write_body(tmp_path / "body", lines)
    size = len(jsonl(*lines))
    del lines
    assert size > 18 * 1024 * 1024
    tracemalloc.start()
    try:
        with Body(path) as body:
            r = post_body(client, body, auth)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.status_code == 200, r.json
    assert r.json["bytes"] == size
    # about 2 MiB, mostly the custom_ids validation keeps (at most MAX_FILE_LINES of them)
    assert peak < 4 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.0f} MiB upload"


def test_storage_failure_is_a_500_naming_the_request_id(app_config, auth, tmp_path):
    (tmp_path / "not-a-dir").write_text("")
    client = client_with(app_config, files_dir=str(tmp_path / "not-a-dir" / "files"))
    r = upload(client, jsonl(request_line()), {**auth, "X-Request-ID": "req-files-1"})
    assert r.status_code == 500
    assert r.json["error"]["type"] == "server_error" and "req-files-1" in r.json["error"]["message"]
