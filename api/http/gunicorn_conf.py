"""gunicorn hooks for ``inferq api``, loaded by path (``--config``) so that gunicorn's
master process does not import the app before gevent patches its workers."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from config import get_settings
from config.logs import dict_config

OWNED_METRICS_DIR = "INFERQ_OWNED_METRICS_DIR"

_settings = get_settings()
logconfig_dict = dict_config(_settings.log_level, _settings.log_format)
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms'


def child_exit(server: Any, worker: Any) -> None:
    """A worker process died: drop its live gauge files from the multiprocess metrics."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    """Remove the metrics directory `inferq api` created for this run."""
    owned = os.environ.get(OWNED_METRICS_DIR)
    if owned:
        shutil.rmtree(owned, ignore_errors=True)


def post_worker_init(worker: Any) -> None:
    """Answer requests gunicorn refuses itself (malformed headers, duplicate
    ``Content-Length``, header fields over its limits) in OpenAI's error shape, and
    give slow clients deadlines for a request's head and body (:mod:`api.http.deadlines`),
    write each streamed chunk with one ``send`` (:func:`api.http.socket_writer.write_chunk`),
    and let a stream's chunks go straight to its socket
    (:func:`api.http.socket_writer.capture_response`).

    gunicorn writes those pages with ``gunicorn.util.write_error`` (HTML) before any
    WSGI code runs, so the app's error handlers never see them; replacing that one
    function in our worker processes is the only hook it offers.
    """
    from gunicorn import util

    from api.http import deadlines, socket_writer  # the worker has loaded the app (and gevent patched) by now

    util.write_error = write_openai_error
    util.write_chunk = socket_writer.write_chunk
    deadlines.install(worker, _settings)
    worker.wsgi = socket_writer.capture_response(worker.wsgi)


def write_openai_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's ``write_error``, with an OpenAI-shaped JSON body instead of HTML."""
    from gunicorn import util

    error_type = "invalid_request_error" if status_int < 500 else "server_error"
    body = json.dumps({"error": {"message": mesg or reason, "type": error_type, "param": None,
                                 "code": None}}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nX-Content-Type-Options: nosniff\r\n\r\n")
    util.write_nonblock(sock, head.encode("latin1") + body)
