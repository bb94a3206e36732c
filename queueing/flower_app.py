"""The Celery app Flower loads: ``celery -A queueing.flower_app:app flower`` (``inferq flower``).

Flower's ``-A`` needs a module-level app, so this module builds one when imported; it is
the only one. Everything else builds its own with :func:`queueing.celery_app.make_celery`.
"""

from __future__ import annotations

from config import get_settings
from queueing.celery_app import make_celery

app = make_celery(get_settings())
