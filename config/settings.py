"""The one settings object of inferq, read from the environment and ``.env``.

Names mirror the ones a vLLM user already knows (MODEL_NAME, SERVED_MODEL_NAME,
TP_SIZE, DTYPE, MAX_MODEL_LEN, MAX_NUM_SEQS, GPU_MEMORY_UTILIZATION). Every
field is documented, with its default, in ``config/.env.example``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_KEYS = frozenset({"dev-key-1", "dev-key-2", "changeme", "test", "secret"})


class Settings(BaseSettings):
    """Configuration shared by the API, the workers and the tools."""

    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", case_sensitive=False, env_ignore_empty=True
    )

    # Model and engine
    model_name: str = Field("models/SmolLM2-135M-Instruct", description="local dir or hub id")
    served_model_name: str = "SmolLM2-135M-Instruct"
    engine: Literal["vllm", "scripted"] = "vllm"
    gpu_ids: str = ""
    tp_size: int = Field(1, ge=1)
    dtype: str = "auto"
    max_model_len: int = Field(2048, ge=16)
    max_num_seqs: int = Field(16, ge=1, le=1024)
    batch_share: float = Field(0.5, gt=0, le=1)
    max_queue_depth: int = Field(256, ge=0)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    kv_cache_space_gib: int = Field(4, ge=1)
    enforce_eager: bool | None = None
    scripted_token_delay: float = Field(0.0, ge=0)

    # vLLM's OpenAI serving layer on the worker: its server options, by their vLLM names
    tool_call_parser: str = ""
    enable_auto_tool_choice: bool = False
    reasoning_parser: str = ""
    chat_template: str = ""
    chat_template_content_format: str = "auto"
    response_role: str = "assistant"
    generation_config: str = "auto"
    max_logprobs: int = Field(20, ge=-1)
    enable_prompt_tokens_details: bool = False
    return_tokens_as_token_ids: bool = False
    exclude_tools_when_tool_choice_none: bool = False
    trust_request_chat_template: bool = False
    # Any other `vllm serve` options, as on its command line (shell syntax).
    vllm_extra_args: str = ""

    # Services
    redis_url: str = "redis://127.0.0.1:6379/0"
    database_url: str = "sqlite:///data/inferq.db"

    # Files (uploads for batches, batch outputs): shared storage when several API hosts serve
    files_dir: str = "data/files"
    max_file_bytes: int = Field(200 * 1024 * 1024, ge=1)
    max_file_lines: int = Field(50_000, ge=1)

    # Processes and ports
    api_host: str = "0.0.0.0"
    api_port: int = 8020
    api_workers: int = Field(2, ge=1)
    flower_port: int = 5555
    worker_metrics_port: int = 9200
    gpu_monitor_port: int = 9101
    gpu_monitor_interval: float = Field(5.0, gt=0)
    # Where each API process writes its metric files for gunicorn multiprocess mode
    # (PROMETHEUS_MULTIPROC_DIR); empty = a fresh directory per `inferq api` start.
    prometheus_multiproc_dir: str = ""

    # Access
    api_keys: str = ""

    # Limits and deadlines (seconds)
    queue_timeout: float = Field(120.0, gt=0)
    idle_timeout: float = Field(60.0, gt=0)
    job_ttl: int = Field(86400, ge=60)
    visibility_timeout: int = Field(3600, ge=60)
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    ip_rate_limit: str = "600/minute"
    auth_failure_limit: str = "20/minute"
    # Proxies in front of the API that append to X-Forwarded-For (0 = clients connect directly).
    trusted_proxy_count: int = Field(0, ge=0)
    # Celery task events (task-received/started/succeeded...) for Flower's task views: three
    # more Redis publishes per task, about a third of a worker's CPU per short request.
    # Worker heartbeats (Flower's worker list, its worker metrics) are sent either way.
    worker_task_events: bool = False
    worker_heartbeat_interval: float = Field(2.0, gt=0)
    worker_heartbeat_ttl: float = Field(6.0, gt=0)

    # Drain settled usage into the SQL ledger from a background thread of each API process.
    ledger_drain: bool = True

    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    # Seconds an API process keeps serving open streams after SIGTERM before it exits.
    api_graceful_timeout: int = Field(30, ge=0)
    # Seconds an idle keep-alive connection stays open: above clients' own idle expiry
    # (httpx, the OpenAI SDK: 5 s) and load balancers' (often 60 s), so the server is never
    # the side that closes a connection just as a client reuses it.
    api_keepalive: int = Field(75, ge=1)

    @property
    def bootstrap_keys(self) -> list[str]:
        """API keys configured in the environment (comma separated)."""
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    @property
    def placeholder_keys(self) -> list[str]:
        """Bootstrap keys that look like placeholders and deserve a warning."""
        return [k for k in self.bootstrap_keys if k.lower() in PLACEHOLDER_KEYS or len(k) < 16]

    @property
    def sqlite_path(self) -> Path | None:
        """The file behind a ``sqlite:///`` URL, to create its directory."""
        prefix = "sqlite:///"
        if self.database_url.startswith(prefix) and self.database_url != prefix + ":memory:":
            return Path(self.database_url[len(prefix) :])
        return None


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings of this process, read once."""
    return Settings()
