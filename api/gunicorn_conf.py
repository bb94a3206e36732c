"""gunicorn hooks for ``inferq api``, loaded by path (``--config``) so that gunicorn's
master process does not import the app before gevent patches its workers."""

from __future__ import annotations

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
