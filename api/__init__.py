"""The inferq HTTP API: an OpenAI-compatible Flask app in front of the queue."""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.middleware.proxy_fix import ProxyFix

from api.accounts.keys import check_bootstrap_keys
from api.accounts.ratelimit import AUTH_GATE, AuthFailureGate, ip_limiter
from api.accounts.routes import bp as usage_bp
from api.batches.routes import bp as batches_bp
from api.files.routes import bp as files_bp
from api.files.store import remove_stale_parts
from api.generation.models import bp as models_bp
from api.generation.routes import bp as completions_bp
from api.http import errors, metrics
from api.http.health import bp as health_bp
from api.http.json_limits import JSONLimits, LimitedJSONProvider
from api.http.openapi_routes import bp as openapi_bp
from api.jobs.routes import bp as jobs_bp
from api.services import build_services
from config import Settings, get_settings, logs, tracing

log = logging.getLogger(__name__)

REQUEST_ID = re.compile(r"[\w.-]{1,64}")

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
UPLOAD_PATH = "/v1/files"
MULTIPART_OVERHEAD = 64 * 1024  # an upload's body: the file plus boundaries, part headers, purpose


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Build the API: settings, services, hooks, blueprints.

    ``test_config`` overrides settings fields (as ``Settings(**test_config)``).
    """
    settings = Settings(**test_config) if test_config else get_settings()
    logs.configure(settings.log_level, settings.log_format)
    weak_keys = check_bootstrap_keys(settings)  # raises under ENV=production
    tracing.init_tracing("inferq-api")
    app = Flask(__name__, static_folder=None)
    if settings.trusted_proxy_count:  # the client address is the proxies' X-Forwarded-For entry
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxy_count)  # type: ignore[method-assign]
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json = LimitedJSONProvider(app, JSONLimits.from_settings(settings))  # bodies over the caps: 400
    app.json.sort_keys = False

    services = build_services(settings)
    remove_stale_parts(services.files.root)  # what a crashed upload left behind
    app.extensions["inferq"] = services
    client = services.gateway.redis
    if weak_keys:
        log.warning(weak_keys)

    _register_hooks(app, settings)
    metrics.init_app(app, settings, client)
    errors.register_error_handlers(app)
    limiter = ip_limiter(app, settings)
    limiter.limit(settings.ip_rate_limit)(health_bp)
    limiter.limit(settings.ip_rate_limit)(openapi_bp)
    api_blueprints = (models_bp, completions_bp, jobs_bp, usage_bp, files_bp, batches_bp)
    # One brute-force budget per client address over every /v1 endpoint: require_api_key
    # asks the gate once it checked the key.
    app.extensions[AUTH_GATE] = AuthFailureGate(client, settings.auth_failure_limit)
    for blueprint in (health_bp, openapi_bp, *api_blueprints):
        app.register_blueprint(blueprint)
    return app


def _too_large(limit: int) -> Response:
    return errors.to_response(errors.error(413, f"Request body too large: the limit is {limit} bytes.",
                                           "invalid_request_error", "request_too_large"))


def _register_hooks(app: Flask, settings: Settings) -> None:
    @app.before_request
    def _request_id() -> None:
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        logs.request_id.set(g.request_id)

    @app.before_request
    def _reject_oversize() -> Response | None:
        # Before auth and before any parsing: the declared length is enough. A chunked body
        # (no length) is read here, up to the limit, so it too is refused before auth. Uploads
        # get their own limit, which werkzeug enforces while parsing a chunked upload (after auth:
        # buffering up to MAX_FILE_BYTES for unauthenticated clients would cost more).
        if request.method == "POST" and request.path == UPLOAD_PATH:
            request.max_content_length = settings.max_file_bytes + MULTIPART_OVERHEAD
            if (request.content_length or 0) > request.max_content_length:
                return errors.to_response(errors.error(
                    413, f"Upload too large: a file may hold at most {settings.max_file_bytes} bytes.",
                    "invalid_request_error", "file_too_large", "file"))
        elif request.content_length is not None:
            if request.content_length > settings.max_request_bytes:
                return _too_large(settings.max_request_bytes)
        elif "chunked" in request.headers.get("Transfer-Encoding", "").lower():
            # Read (and cache for the view) one byte past the limit at most: werkzeug stops there.
            request.max_content_length = settings.max_request_bytes + 1
            if len(request.get_data()) > settings.max_request_bytes:
                return _too_large(settings.max_request_bytes)
        return None

    @app.after_request
    def _security_headers(response: Response) -> Response:
        response.headers.update(SECURITY_HEADERS)
        response.headers.update(g.get("ratelimit_headers", {}))
        response.headers["X-Request-ID"] = g.get("request_id", "")
        if request.path.startswith("/v1/"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response
