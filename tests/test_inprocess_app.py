"""The worker's in-process copy of vLLM's app leaves out the middleware that only a network server needs."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_fastapi_instrumentator import Instrumentator
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from workers.asgi_call import call_app
from workers.vllm_engine import without_http_middleware


class Kept:
    """Stands for vLLM's own middleware (scaling, authentication), which the worker keeps."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def test_cors_and_the_http_instrumentator_are_dropped_and_the_rest_kept() -> None:
    app = FastAPI()
    app.get("/v1/models")(lambda: {"data": []})
    app.add_middleware(CORSMiddleware, allow_origins=["*"])
    Instrumentator(registry=CollectorRegistry()).instrument(app)
    app.add_middleware(Kept)
    before = [getattr(m.cls, "__name__", "") for m in app.user_middleware]
    assert {"CORSMiddleware", "PrometheusInstrumentatorMiddleware", "Kept"} <= set(before)

    without_http_middleware(app)

    assert [getattr(m.cls, "__name__", "") for m in app.user_middleware] == ["Kept"]
    answer: list[bytes] = []
    status: list[int] = []
    asyncio.run(call_app(app, "GET", "/v1/models", b"", (), lambda code, headers: status.append(code),
                         answer.append))
    assert status == [200] and b"".join(answer) == b'{"data":[]}'
