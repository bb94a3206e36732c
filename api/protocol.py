"""OpenAI wire format: pydantic request and response models, nothing else.

Fields follow OpenAI's order. Conversion to the engine-neutral job parameters
is a method on each request model (``to_params``).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from queueing.jobs import GenerationParams

MAX_STOP_SEQUENCES = 4


def lone_surrogate_at(data: Any) -> str | None:
    """Where ``data`` holds a string with a lone surrogate (JSON's ``"\\ud800"`` decodes to one), if anywhere.

    Such a string is not text: it cannot be encoded, so Redis, Celery and the tokenizer would fail on it.
    """
    stack: list[tuple[str, Any]] = [("", data)]  # iterative: bodies may nest as deep as JSON allows
    while stack:
        path, value = stack.pop()
        if isinstance(value, str) and not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:
                return path
        elif isinstance(value, dict):
            for key, item in value.items():
                child = f"{path}.{key}" if path else str(key)
                stack += [(child, key), (child, item)]
        elif isinstance(value, list):
            stack += [(f"{path}.{i}" if path else str(i), item) for i, item in enumerate(value)]
    return None


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


class TextContentPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class SamplingFields(OpenAIModel):
    """Fields shared by chat and legacy completions."""

    model: str = Field(min_length=1)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logprobs: Any = None
    n: int = Field(1, ge=1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    user: str | None = None
    # vLLM's extensions (send them with the SDK's ``extra_body``)
    top_k: int | None = Field(None, ge=-1)
    min_tokens: int = Field(0, ge=0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        return stops

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("n > 1 is not supported by this server; send n separate requests instead")
        return value

    @field_validator("stream_options")
    @classmethod
    def _options_need_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: Any) -> Any:
        if value not in (None, False, 0):
            raise ValueError("logprobs are not supported by this server")
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _sampling(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": list(self.stop or []),
            "seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "top_k": self.top_k,
            "min_tokens": self.min_tokens,
            "repetition_penalty": self.repetition_penalty,
            "ignore_eos": self.ignore_eos,
        }


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[Any] | None) -> None:
        if value:
            raise ValueError("tool calling is not supported by this server")
        return None

    def to_params(self) -> GenerationParams:
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                    for m in self.messages]
        return GenerationParams(
            kind="chat", messages=messages,
            max_tokens=self.max_completion_tokens or self.max_tokens, **self._sampling(),
        )


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    echo: bool = False
    max_tokens: int = Field(16, ge=1)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return value

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.echo or self.suffix:
            raise ValueError("echo and suffix are not supported by this server")
        return self

    def to_params(self) -> GenerationParams:
        prompt = self.prompt[0] if isinstance(self.prompt, list) else self.prompt
        return GenerationParams(kind="completion", prompt=prompt, max_tokens=self.max_tokens,
                                **self._sampling())


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
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "inferq"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- jobs -------------------------------------------------------------------

JobEndpoint = Literal["/v1/chat/completions", "/v1/completions"]


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
