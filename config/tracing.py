"""Optional OpenTelemetry tracing, configured by OpenTelemetry's own environment variables.

Off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` (export over OTLP/HTTP) or
``OTEL_TRACES_EXPORTER=console`` (spans as JSON on stdout) is set. The API
opens one span per generation request and passes its context along with the
task (W3C ``traceparent``), so the worker's span for the job joins the trace.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

_enabled = False


def init_tracing(service: str) -> bool:
    """Install a tracer provider for ``service`` if the environment asks for one; True if it did."""
    global _enabled
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "")
    if _enabled or not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or exporter_name == "console"):
        return _enabled
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
    except ImportError:
        log.warning("OpenTelemetry is configured but not installed: pip install 'inferq[otel]'")
        return False
    exporter: SpanExporter
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    name = os.environ.get("OTEL_SERVICE_NAME", service)
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
    trace.set_tracer_provider(provider)
    _enabled = True
    log.info("OpenTelemetry tracing on (service %s, exporter %s)", name, exporter_name or "otlp")
    return True


class Span:
    """A span that may outlive the block that opened it (a stream ends later); a no-op when off."""

    def __init__(self, name: str, carrier: dict[str, str] | None = None,
                 attributes: dict[str, Any] | None = None):
        self._span: Any = None
        if not _enabled:
            return
        from opentelemetry import propagate, trace

        parent = propagate.extract(carrier) if carrier else None
        self._span = trace.get_tracer("inferq").start_span(name, context=parent, attributes=attributes)

    @contextlib.contextmanager
    def activated(self) -> Iterator[None]:
        """Make this span the current one for a synchronous block (what it calls joins the trace)."""
        if self._span is None:
            yield
            return
        from opentelemetry import context, trace

        token = context.attach(trace.set_span_in_context(self._span))
        try:
            yield
        finally:
            context.detach(token)

    def set(self, attributes: dict[str, Any]) -> None:
        """Add attributes to the span."""
        if self._span is not None:
            self._span.set_attributes(attributes)

    def end(self, error: str | None = None) -> None:
        """End the span (once), marking it failed with ``error`` if given."""
        if self._span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        if error:
            self._span.set_status(Status(StatusCode.ERROR, error))
        self._span.end()
        self._span = None


def current_carrier() -> dict[str, str] | None:
    """The current trace context as W3C headers (``traceparent``), or None when tracing is off."""
    if not _enabled:
        return None
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None
