"""FileStore (uploads on disk, metadata in SQL) on SQLite and PostgreSQL, without the HTTP layer."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import pytest
from sqlalchemy import update

from api.db import Database, StoredFile
from api.files.store import CHUNK_BYTES, FilePage, FileStore
from api.protocol import ErrorResponse
from config import Settings
from tests.test_files import jsonl, request_line


@pytest.fixture
def store(database: Database, database_url: str, tmp_path: Path) -> FileStore:
    return FileStore(database, Settings(_env_file=None, database_url=database_url,
                                        files_dir=str(tmp_path / "store"), max_file_lines=100))


class ChunkCheckingStream(io.BytesIO):
    """A request body that fails the test if read whole rather than in chunks."""

    def read(self, size: int | None = -1) -> bytes:
        assert size is not None and 0 < size <= CHUNK_BYTES
        return super().read(size)


def test_store_upload_then_iter_lines(store):
    first, second = request_line("a"), request_line("b")
    content = jsonl(first) + b"\n" + jsonl(second)
    info = store.save_upload("key_1", "two.jsonl", "batch", ChunkCheckingStream(content))
    assert not isinstance(info, ErrorResponse)
    assert (info.key_id, info.filename, info.purpose, info.line_count) == ("key_1", "two.jsonl", "batch", 2)
    assert info.path == f"{info.id}.jsonl" and store.path_of(info) == store.root / info.path
    assert list(store.iter_lines(info)) == [(1, first), (3, second)]
    assert store.get("key_1", info.id) == info
    assert store.get("key_2", info.id) is None


def test_store_create_output(store):
    lines = ['{"custom_id":"a","response":null}', '{"custom_id":"b","response":null}\n', ""]
    info = store.create_output("key_1", "batch_x_output.jsonl", lines)
    assert (info.purpose, info.line_count, info.filename) == ("batch_output", 2, "batch_x_output.jsonl")
    content = store.path_of(info).read_bytes()
    assert content == b'{"custom_id":"a","response":null}\n{"custom_id":"b","response":null}\n'
    assert info.bytes == len(content)
    assert [n for n, _ in store.iter_lines(info)] == [1, 2]
    assert [line["custom_id"] for _, line in store.iter_lines(info)] == ["a", "b"]
    assert sorted(p.name for p in store.root.iterdir()) == [info.path]  # no temporary file left


def test_store_output_under_a_fixed_id(store):
    info = store.create_output("key_1", "b_output.jsonl", ['{"a":1}'], file_id="file-b-output")
    assert (info.id, info.path, info.line_count) == ("file-b-output", "file-b-output.jsonl", 1)
    source = store.root / ".batch-c-output.jsonl"  # a batch's output, written as its lines finished
    source.write_bytes(b'{"c":1}\n{"c":2}\n')
    kept = store.keep_output(source, "key_1", "c_output.jsonl", 16, 2, file_id="file-c-output")
    assert (kept.id, kept.bytes, kept.line_count, kept.purpose) == ("file-c-output", 16, 2, "batch_output")
    assert not source.exists() and [line for _, line in store.iter_lines(kept)] == [{"c": 1}, {"c": 2}]
    assert store.get("key_1", "file-c-output") == kept
    assert sorted(p.name for p in store.root.iterdir()) == ["file-b-output.jsonl", "file-c-output.jsonl"]


def test_store_create_output_leaves_no_temporary_file_when_its_lines_fail(store):
    def lines_then_failure():
        yield '{"a":1}'
        raise RuntimeError("the database went away")

    with pytest.raises(RuntimeError, match="went away"):
        store.create_output("key_1", "o.jsonl", lines_then_failure(), file_id="file-o-output")
    assert list(store.root.iterdir()) == [] and store.get("key_1", "file-o-output") is None


def test_store_list_orders_ties_by_id_and_filters(store, database):
    infos = [store.create_output("key_1", f"{i}.jsonl", ['{"i":1}']) for i in range(5)]
    with database.sessions.begin() as session:  # one timestamp for all: the id breaks the tie
        session.execute(update(StoredFile).values(created_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC)))
    pages, after = [], None
    while True:
        page = store.list("key_1", 2, after)
        assert isinstance(page, FilePage)
        pages.append([info.id for info in page.data])
        if not page.has_more:
            break
        after = page.data[-1].id
    assert [len(p) for p in pages] == [2, 2, 1]
    assert sum(pages, []) == sorted((info.id for info in infos), reverse=True)
    assert store.list("key_2", 10, None) == FilePage([], has_more=False)
    assert store.list("key_1", 10, None, purpose="batch") == FilePage([], has_more=False)
    assert isinstance(store.list("key_2", 10, infos[0].id), ErrorResponse)  # another key's id


def test_store_delete(store):
    info = store.create_output("key_1", "o.jsonl", ['{"a":1}'])
    assert store.delete("key_2", info.id) is False and store.path_of(info).exists()
    assert store.delete("key_1", info.id) is True
    assert not store.path_of(info).exists() and store.get("key_1", info.id) is None
    assert store.delete("key_1", info.id) is False


