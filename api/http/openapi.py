"""The API's OpenAPI 3.1 document, served at ``/openapi.json``.

Every schema is generated from the pydantic models of :mod:`api.protocol`
(``components.schemas``); only the bodies that routes build or read by hand
(usage, probes, the multipart upload) are described by the small models below.
Paths, parameters, security and error responses are declared here, and a test
compares the paths with the app's routes so the two cannot drift apart.
"""

from __future__ import annotations

import functools
import importlib.metadata
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from api import protocol
from config import Settings

OPENAPI_VERSION = "3.1.0"
SCHEMA_REF = "#/components/schemas/{model}"
Json = dict[str, Any]


# --- bodies the routes build or read by hand ---------------------------------------------


class FileUpload(BaseModel):
    """``POST /v1/files``: a multipart form."""

    file: bytes
    purpose: Literal["batch"]


class UsageKey(BaseModel):
    id: str
    name: str
    prefix: str


class UsageTotals(BaseModel):
    date: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class DailyQuota(BaseModel):
    """Every field is ``null`` for a key without a daily quota."""

    limit: int | None
    used: int | None
    reserved: int | None
    remaining: int | None


class UsageDay(UsageTotals):
    model: str


class UsageReport(BaseModel):
    object: Literal["usage"] = "usage"
    key: UsageKey
    today: UsageTotals
    daily_quota: DailyQuota
    start_date: str
    end_date: str
    data: list[UsageDay]


class HealthStatus(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyStatus(BaseModel):
    status: Literal["ready"] = "ready"
    models: list[str]


REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    protocol.ChatCompletionRequest, protocol.CompletionRequest, protocol.ResponsesRequest,
    protocol.TokenizeRequest, protocol.DetokenizeRequest, protocol.JobCreateRequest,
    protocol.BatchCreateRequest, FileUpload,
)
RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    protocol.ChatCompletionResponse, protocol.ChatCompletionChunk, protocol.CompletionResponse,
    protocol.ResponseObject, protocol.TokenizeResponse, protocol.DetokenizeResponse,
    protocol.ModelList, protocol.JobObject, protocol.JobList, protocol.BatchObject, protocol.BatchList,
    protocol.FileObject, protocol.FileList, protocol.FileDeleted, protocol.ErrorResponse, UsageReport,
    HealthStatus, ReadyStatus,
)

ERRORS = {
    400: "Invalid request: a malformed body, or a request vLLM's serving layer refuses (a field out of "
         "range, a prompt longer than the model's context ...), with vLLM's own message.",
    401: "Missing or invalid API key.",
    404: "Unknown model (or one the key may not use), or no such object for this key.",
    408: "The request's body arrived too slowly (`BODY_READ_TIMEOUT`, `BODY_MIN_RATE`); the "
         "connection is closed.",
    413: "Request body larger than the server accepts.",
    429: "Rate limit (`rate_limit_exceeded`, type `requests` or `tokens`) or daily quota "
         "(`quota_exceeded`); see `Retry-After`.",
    503: "No live worker for the model, queue full (`queue_full`) or queue unavailable, or (jobs and "
         "batches) no Redis replica confirmed the request (`replication_unavailable`); see `Retry-After`.",
    504: "The request timed out in the queue or between tokens.",
}
#: Where the Redis WAIT policy (queueing.replication) can refuse: POST /v1/jobs and /v1/batches.
REPLICATION_503 = ("With Redis replication required (`REDIS_SENTINELS`, or `REDIS_WAIT_REPLICAS` > 0) and "
                   "`REDIS_WAIT_POLICY=refuse`, a {} that no replica confirms within `REDIS_WAIT_TIMEOUT_MS` "
                   "gets a 503 `replication_unavailable` with `Retry-After` and never runs.")
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.",
                               "schema": {"type": "integer"}}}


def build_openapi(settings: Settings) -> Json:
    """The OpenAPI 3.1 document for an app built with ``settings`` (cached; do not mutate it)."""
    return _document(settings.served_model_name, settings.max_request_bytes, settings.max_file_bytes)


@functools.lru_cache(maxsize=8)
def _document(model: str, max_request_bytes: int, max_file_bytes: int) -> Json:
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "inferq",
            "version": _version(),
            "description": "Queue-based, OpenAI-compatible LLM inference. Every error has OpenAI's shape "
                           "`{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`.",
        },
        "tags": [{"name": name} for name in ("models", "chat", "completions", "responses", "tokenize", "jobs",
                                             "files", "batches", "usage", "probes")],
        "paths": _paths(model, max_request_bytes, max_file_bytes),
        "components": {
            "schemas": _schemas(),
            "responses": {str(status): _error_response(text) for status, text in ERRORS.items()},
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer",
                               "description": "`Authorization: Bearer <API key>`"},
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
        "security": [{"bearerAuth": []}, {"apiKeyHeader": []}],
    }


def _version() -> str:
    try:
        return importlib.metadata.version("inferq")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def _schemas() -> Json:
    """``components.schemas``: requests as pydantic validates them, responses as it serializes them."""
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [(m, "validation") for m in REQUEST_MODELS]
    models += [(m, "serialization") for m in RESPONSE_MODELS]
    _, top = models_json_schema(models, ref_template=SCHEMA_REF)
    schemas: Json = top["$defs"]
    # A job's ``body`` is validated as the request model of its ``endpoint`` (api.jobs.serving).
    schemas["JobCreateRequest"]["properties"]["body"] = {
        "anyOf": [_ref("ChatCompletionRequest"), _ref("CompletionRequest"), _ref("ResponsesRequest")],
        "description": "The request for `endpoint`, as it would be sent there (without `stream`).",
    }
    return schemas


# --- building blocks ---------------------------------------------------------------------


def _ref(model: str) -> Json:
    return {"$ref": SCHEMA_REF.format(model=model)}


def _json_body(model: str, example: Json | None = None) -> Json:
    media: Json = {"schema": _ref(model)}
    if example is not None:
        media["example"] = example
    return {"required": True, "content": {"application/json": media}}


def _error_response(description: str) -> Json:
    response: Json = {"description": description,
                      "content": {"application/json": {"schema": _ref("ErrorResponse")}}}
    if "Retry-After" in description:
        response["headers"] = RETRY_AFTER
    return response


def _ok(model: str, description: str = "OK") -> Json:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _generation_ok(model: str, chunk: str) -> Json:
    """200: the JSON object, or with ``stream: true`` server-sent events."""
    return {
        "description": f"`{model}`; with `stream: true`, server-sent events: `data: <{chunk}>` frames (an "
                       "error mid-stream is a `data: {\"error\": ...}` frame), then `data: [DONE]`.",
        "content": {
            "application/json": {"schema": _ref(model)},
            "text/event-stream": {"schema": {"type": "string",
                                             "description": f"`data: <{chunk} JSON>` frames."}},
        },
    }


def _param(name: str, where: str, schema: Json, description: str = "", required: bool = False) -> Json:
    param: Json = {"name": name, "in": where, "required": required or where == "path", "schema": schema}
    if description:
        param["description"] = description
    return param


def _id(name: str) -> Json:
    return _param(name, "path", {"type": "string"})


def _page(max_limit: int, default: int) -> list[Json]:
    return [
        _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": max_limit, "default": default}),
        _param("after", "query", {"type": "string"}, "The id of the last object of the previous page."),
    ]


def _op(op_id: str, tag: str, summary: str, responses: Json, errors: tuple[int, ...],
        public: bool = False, **extra: Any) -> Json:
    operation: Json = {"operationId": op_id, "tags": [tag], "summary": summary, **extra,
                       "responses": {**responses,
                                     **{str(s): {"$ref": f"#/components/responses/{s}"} for s in errors}}}
    if public:
        operation["security"] = []
    return operation


# --- paths -------------------------------------------------------------------------------


def _paths(model: str, max_request_bytes: int, max_file_bytes: int) -> Json:
    body_errors = (400, 401, 404, 408, 413, 429, 503, 504)
    chat_example = {"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16}
    completion_example = {"model": model, "prompt": "Once upon a time", "max_tokens": 16}
    return {
        "/v1/models": {"get": _op("listModels", "models", "Models that live workers serve.",
                                  {"200": _ok("ModelList")}, (401, 429, 503))},
        "/v1/chat/completions": {"post": _op(
            "createChatCompletion", "chat", "Chat completion, buffered or streamed.",
            {"200": _generation_ok("ChatCompletionResponse", "ChatCompletionChunk")}, body_errors,
            requestBody=_json_body("ChatCompletionRequest", chat_example),
            description=f"Bodies over {max_request_bytes} bytes get a 413.")},
        "/v1/completions": {"post": _op(
            "createCompletion", "completions", "Legacy text completion, buffered or streamed.",
            {"200": _generation_ok("CompletionResponse", "CompletionResponse")}, body_errors,
            requestBody=_json_body("CompletionRequest", completion_example),
            description=f"Bodies over {max_request_bytes} bytes get a 413.")},
        "/v1/responses": {"post": _op(
            "createResponse", "responses", "OpenAI's Responses API, buffered or streamed (vLLM's serving).",
            {"200": _generation_ok("ResponseObject", "response event")}, body_errors,
            requestBody=_json_body("ResponsesRequest", {"model": model, "input": "Hello!",
                                                        "max_output_tokens": 16}),
            description="Streamed as `event: <type>` + `data: <event JSON>` frames. Responses are not "
                        "stored (no `previous_response_id`). "
                        f"Bodies over {max_request_bytes} bytes get a 413.")},
        "/tokenize": {"post": _op(
            "tokenize", "tokenize", "Token ids of a prompt or of chat messages (vLLM's `/tokenize`).",
            {"200": _ok("TokenizeResponse")}, body_errors,
            requestBody=_json_body("TokenizeRequest", {"model": model, "prompt": "Hello world"}))},
        "/detokenize": {"post": _op(
            "detokenize", "tokenize", "The text of token ids (vLLM's `/detokenize`).",
            {"200": _ok("DetokenizeResponse")}, body_errors,
            requestBody=_json_body("DetokenizeRequest", {"model": model, "tokens": [19556, 905]}))},
        "/v1/jobs": {
            "post": _op("createJob", "jobs",
                        "Run one chat, completions or responses request as a job (batch priority).",
                        {"202": _ok("JobObject", "The queued job.")}, (400, 401, 404, 413, 429, 503),
                        requestBody=_json_body("JobCreateRequest", {
                            "endpoint": "/v1/chat/completions", "body": chat_example}),
                        description=REPLICATION_503.format("job")),
            "get": _op("listJobs", "jobs", "This key's jobs, newest first.", {"200": _ok("JobList")},
                       (400, 401, 429), parameters=_page(100, 20)),
        },
        "/v1/jobs/{job_id}": {"get": _op(
            "retrieveJob", "jobs", "A job's status and, once it succeeded, its response.",
            {"200": _ok("JobObject")}, (400, 401, 404, 429), parameters=[
                _id("job_id"),
                _param("wait", "query", {"type": "number", "minimum": 0, "maximum": 60, "default": 0},
                       "Long-poll up to this many seconds for the job to end.")])},
        "/v1/jobs/{job_id}/cancel": {"post": _op(
            "cancelJob", "jobs", "Cancel a job: a queued one never runs, a running one is aborted.",
            {"200": _ok("JobObject")}, (401, 404, 429), parameters=[_id("job_id")])},
        "/v1/files": {
            "post": _op("createFile", "files", "Upload a batch input file (JSONL), each line checked.",
                        {"200": _ok("FileObject")}, (400, 401, 413, 429), requestBody={
                            "required": True,
                            "content": {"multipart/form-data": {"schema": _ref("FileUpload")}}},
                        description=f"Files over {max_file_bytes} bytes get a 413."),
            "get": _op("listFiles", "files", "This key's files, newest first.", {"200": _ok("FileList")},
                       (400, 401, 429), parameters=[*_page(10_000, 10_000),
                                                    _param("purpose", "query", {"type": "string"})]),
        },
        "/v1/files/{file_id}": {
            "get": _op("retrieveFile", "files", "A file's metadata.", {"200": _ok("FileObject")},
                       (401, 404, 429), parameters=[_id("file_id")]),
            "delete": _op("deleteFile", "files", "Delete a file: its record and its content.",
                          {"200": _ok("FileDeleted")}, (401, 404, 429), parameters=[_id("file_id")]),
        },
        "/v1/files/{file_id}/content": {"get": _op(
            "downloadFile", "files", "The file's bytes.",
            {"200": {"description": "The file.", "content": {"application/octet-stream": {
                "schema": {"type": "string", "contentMediaType": "application/octet-stream"}}}}},
            (401, 404, 429), parameters=[_id("file_id")])},
        "/v1/batches": {
            "post": _op("createBatch", "batches", "Create a batch from an uploaded input file.",
                        {"200": _ok("BatchObject")}, (400, 401, 404, 413, 429, 503),
                        requestBody=_json_body("BatchCreateRequest"),
                        description=REPLICATION_503.format("batch")),
            "get": _op("listBatches", "batches", "This key's batches, newest first.",
                       {"200": _ok("BatchList")}, (400, 401, 429), parameters=_page(100, 20)),
        },
        "/v1/batches/{batch_id}": {"get": _op(
            "retrieveBatch", "batches", "A batch, with its request counts.", {"200": _ok("BatchObject")},
            (401, 404, 429), parameters=[_id("batch_id")])},
        "/v1/batches/{batch_id}/cancel": {"post": _op(
            "cancelBatch", "batches", "Cancel a batch; the lines already done are kept.",
            {"200": _ok("BatchObject")}, (401, 404, 429), parameters=[_id("batch_id")])},
        "/v1/usage": {"get": _op(
            "retrieveUsage", "usage", "This key's usage: today, the daily quota, and per day and model.",
            {"200": _ok("UsageReport")}, (400, 401, 429, 503), parameters=[
                _param("start_date", "query", {"type": "string", "format": "date"}),
                _param("end_date", "query", {"type": "string", "format": "date"})])},
        "/health": {"get": _op("health", "probes", "Liveness.", {"200": _ok("HealthStatus")}, (429,),
                               public=True)},
        "/ready": {"get": _op("ready", "probes", "Redis reachable, a live worker serves the default model.",
                              {"200": _ok("ReadyStatus")}, (429, 503), public=True)},
        "/metrics": {"get": _op(
            "metrics", "probes", "Prometheus metrics.",
            {"200": {"description": "Prometheus text format.", "content": {"text/plain": {"schema": {
                "type": "string"}}}}}, (), public=True)},
        "/openapi.json": {"get": _op(
            "openapi", "probes", "This document.",
            {"200": {"description": "OpenAPI 3.1.", "content": {"application/json": {"schema": {
                "type": "object"}}}}}, (429,), public=True)},
    }
