"""OpenAI wire format: pydantic request and response models, nothing else.

Requests are read only as far as admission needs (model, stream, token bounds):
the job carries the client's body to the worker, where vLLM's own request models
parse it. Responses of the job, file and batch endpoints are the API's own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.http.surrogates import lone_surrogate_at


class OpenAIModel(BaseModel):
    """Requests ignore unknown fields, as vLLM's server does, and refuse strings that are not text."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        path = lone_surrogate_at(data)
        if path is not None:
            where = f" (at {path.encode('ascii', 'backslashreplace').decode()})" if path else ""
            raise ValueError(f"Strings must be valid Unicode: a lone surrogate is not text{where}.")
        return data


# --- errors ---------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """``{"error": {...}}`` plus the HTTP status (not serialized)."""

    error: ErrorInfo
    status_code: int = Field(400, exclude=True)
    retry_after: int | None = Field(None, exclude=True)


# --- requests -------------------------------------------------------------


#: Most choices (``n``) a request may ask for, as in OpenAI's API: a queue must not let one
#: request put millions of sequences on a worker.
MAX_CHOICES = 128


class StreamOptions(OpenAIModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class GenerationRequest(OpenAIModel):
    """What the API reads of a request to admit and meter it; the worker parses the whole body
    with vLLM's own request models, so every field vLLM's server accepts works (send vLLM's
    extensions with the SDK's ``extra_body``)."""

    model: str = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class ChatCompletionRequest(GenerationRequest):
    """``POST /v1/chat/completions``: OpenAI's and vLLM's fields (tools, response_format,
    logprobs, n, ...) all pass through to vLLM."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = None
    max_tokens: int | None = None
    n: int | None = Field(1, le=MAX_CHOICES)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    temperature: float | None = None


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions``: legacy completions (``echo``, ``logprobs``, several prompts)."""

    prompt: str | list[Any] | None = None
    max_tokens: int | None = 16
    n: int | None = Field(1, le=MAX_CHOICES)
    echo: bool | None = False
    logprobs: int | None = None
    temperature: float | None = None


class ResponsesRequest(GenerationRequest):
    """``POST /v1/responses``: OpenAI's Responses API as vLLM serves it (no stored responses)."""

    input: str | list[Any]
    instructions: str | None = None
    max_output_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    temperature: float | None = None


class TokenizeRequest(OpenAIModel):
    """``POST /tokenize``: a ``prompt`` or chat ``messages``, tokenized by the served model."""

    model: str = Field(min_length=1)
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None


class DetokenizeRequest(OpenAIModel):
    """``POST /detokenize``: token ids back to text."""

    model: str = Field(min_length=1)
    tokens: list[int]


AnyJobBody = (ChatCompletionRequest | CompletionRequest | ResponsesRequest | TokenizeRequest
              | DetokenizeRequest)

#: The request model of each endpoint a job may run.
REQUEST_MODELS: dict[str, type[AnyJobBody]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/responses": ResponsesRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
}


@dataclass(frozen=True)
class JSONText:
    """A JSON response body that is ready to send (vLLM's answer, relayed as it is)."""

    text: str
    status_code: int = 200


# --- responses ------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = Field(None, exclude_if=lambda v: v is None)
    content: str | None = Field(None, exclude_if=lambda v: v is None)


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """Buffered responses and stream chunks share this shape."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    """A model as vLLM's server lists it (its worker publishes the card)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vllm"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[dict[str, Any]] = Field(default_factory=list)


class ResponseObject(BaseModel):
    """A Responses API ``response`` object, as vLLM's server returns it."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["response"] = "response"
    created_at: int
    model: str
    status: str
    output: list[dict[str, Any]]
    usage: dict[str, Any] | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- jobs -------------------------------------------------------------------

JobEndpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/responses"]


class JobCreateRequest(OpenAIModel):
    endpoint: JobEndpoint
    body: dict[str, Any]
    metadata: dict[str, str] | None = Field(None, max_length=16)


class JobObject(BaseModel):
    id: str
    object: Literal["job"] = "job"
    endpoint: str
    model: str
    status: str
    created_at: int
    started_at: int | None = None
    completed_at: int | None = None
    metadata: dict[str, str] | None = None
    response: dict[str, Any] | None = None
    usage: UsageInfo | None = None
    error: ErrorInfo | None = None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


# --- batches ----------------------------------------------------------------


class BatchCreateRequest(OpenAIModel):
    input_file_id: str = Field(min_length=1)
    endpoint: JobEndpoint
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = Field(None, max_length=16)


class BatchRequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchInputTokensDetails(BaseModel):
    cached_tokens: int = 0


class BatchOutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class BatchUsage(BaseModel):
    """A batch's token totals, in the shape of OpenAI's ``Batch.usage`` (not a completion's usage)."""

    input_tokens: int
    input_tokens_details: BatchInputTokensDetails = Field(default_factory=BatchInputTokensDetails)
    output_tokens: int
    output_tokens_details: BatchOutputTokensDetails = Field(default_factory=BatchOutputTokensDetails)
    total_tokens: int


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: dict[str, Any] | None = None
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None = None
    model: str | None = None
    usage: BatchUsage | None = None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


# --- files ------------------------------------------------------------------


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool
