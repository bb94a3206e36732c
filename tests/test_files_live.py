"""The Files API through the official ``openai`` SDK and httpx, against a real gunicorn + gevent server."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import TEST_KEY, start_api
from tests.test_files import jsonl, request_line


@pytest.fixture(scope="module")
def live_api(redis_url, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("files-api")
    api, base = start_api(redis_url, tmp, FILES_DIR=str(tmp / "files"), MAX_FILE_BYTES="65536")
    yield base, tmp / "files"
    api.stop()


def test_openai_sdk_round_trip(live_api, tmp_path):
    base, files_dir = live_api
    sdk = openai.OpenAI(base_url=f"{base}/v1", api_key=TEST_KEY, max_retries=0)
    path = tmp_path / "requests.jsonl"
    path.write_bytes(jsonl(request_line("a"), request_line("b")))

    with path.open("rb") as handle:
        created = sdk.files.create(file=handle, purpose="batch")
    assert created.id.startswith("file-") and created.object == "file"
    assert (created.filename, created.purpose, created.bytes, created.status) == (
        "requests.jsonl", "batch", path.stat().st_size, "processed")
    assert (files_dir / f"{created.id}.jsonl").read_bytes() == path.read_bytes()

    assert sdk.files.retrieve(created.id) == created
    assert created.id in [f.id for f in sdk.files.list()]
    assert [f.id for f in sdk.files.list(purpose="batch")] == [created.id]
    assert sdk.files.content(created.id).text == path.read_text()
    assert sdk.files.content(created.id).content == path.read_bytes()

    deleted = sdk.files.delete(created.id)
    assert deleted.id == created.id and deleted.deleted is True
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.files.retrieve(created.id)
    assert caught.value.code == "file_not_found"
    assert not (files_dir / f"{created.id}.jsonl").exists()


def test_openai_sdk_sees_validation_errors(live_api, tmp_path):
    base, _ = live_api
    sdk = openai.OpenAI(base_url=f"{base}/v1", api_key=TEST_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.files.create(file=("bad.jsonl", jsonl(request_line("a"), request_line("a"))), purpose="batch")
    assert caught.value.code == "invalid_file" and caught.value.param == "file"
    assert "line 2: duplicate custom_id 'a'" in caught.value.message


def test_live_uploads_past_max_request_bytes_and_chunked_oversize(live_api):
    base, _ = live_api
    headers = {"Authorization": f"Bearer {TEST_KEY}"}
    content = jsonl(*[request_line(f"r{i}", body={"model": "m", "prompt": "p" * 100}) for i in range(300)])
    assert 4 * 1024 * 1024 > len(content) > 32 * 1024
    r = httpx.post(f"{base}/v1/files", headers=headers, data={"purpose": "batch"},
                   files={"file": ("big.jsonl", content)}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["bytes"] == len(content)

    def chunks():  # no Content-Length: Transfer-Encoding: chunked
        yield b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\n\r\n"
        for _ in range(64):
            yield b"x" * 4096
        yield b"\r\n--xyz--\r\n"

    r = httpx.post(f"{base}/v1/files", content=chunks(), timeout=30,
                   headers={**headers, "Content-Type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 413
    assert r.json()["error"]["type"] == "invalid_request_error"
