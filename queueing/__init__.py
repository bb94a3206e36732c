"""The contract between API and workers: Celery app, Redis keys, job record,
token events, pub/sub channels and worker liveness."""
