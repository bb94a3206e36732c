"""Logging for every inferq process: one JSON object per line (``LOG_FORMAT=json``)
or plain text, each line naming the request and job it belongs to.

The API sets :data:`request_id` per request; the worker sets it, with
:data:`job_id`, for the job it runs (the request id travels in the task), so
one request's lines can be found across processes and machines.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Any

from pythonjsonlogger.json import JsonFormatter

request_id: ContextVar[str] = ContextVar("request_id", default="-")
job_id: ContextVar[str] = ContextVar("job_id", default="-")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s %(job_id)s]: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(process)d %(threadName)s %(message)s"
JSON_RENAMES = {"asctime": "time", "levelname": "level", "name": "logger", "threadName": "thread"}


class ContextFilter(logging.Filter):
    """Adds ``request_id`` and ``job_id`` (``-`` when unknown) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        if not hasattr(record, "job_id"):
            record.job_id = job_id.get()
        return True


def formatter(log_format: str) -> logging.Formatter:
    """The formatter for ``LOG_FORMAT`` (``json`` or ``text``)."""
    if log_format == "json":
        return JsonFormatter(JSON_FIELDS, rename_fields=JSON_RENAMES, timestamp=False)
    return logging.Formatter(TEXT_FORMAT)


def configure(level: str, log_format: str, *, replace: bool = False) -> None:
    """Log to stderr in ``log_format``; leaves a host's own setup alone unless ``replace``."""
    root = logging.getLogger()
    if root.handlers and not replace:
        return
    for old in list(root.handlers):
        root.removeHandler(old)
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(log_format))
    handler.addFilter(ContextFilter())
    root.addHandler(handler)
    root.setLevel(level.upper())


def dict_config(level: str, log_format: str) -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` for gunicorn's own loggers in the same format."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": ContextFilter}},
        "formatters": {"main": {"()": formatter, "log_format": log_format}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "main",
                                "filters": ["context"], "stream": "ext://sys.stderr"}},
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": level.upper(), "handlers": ["stderr"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
        },
    }
