"""Submit-and-poll jobs: ``/v1/jobs`` (its blueprint and serving logic; a job's record lives
in Redis, ``queueing.jobs``)."""
