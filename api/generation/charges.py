"""The token charge of a generation request (``/v1/chat/completions`` and its siblings, and
``/v1/jobs``): its worst case against the caller's tokens per minute, and the headers of a
charge that was taken."""

from __future__ import annotations

from flask import g

from api.accounts.ratelimit import TokenCharge
from api.extensions import services
from api.generation.job_request import worst_case_tokens
from queueing.jobs import JobRequest


def token_charge(job: JobRequest) -> TokenCharge:
    """The request's worst case, for the gateway to charge against the caller's tokens per
    minute once the request passed every other check."""
    svc, principal = services(), g.principal
    tokens = worst_case_tokens(job, svc.settings.max_model_len)
    return TokenCharge(svc.rate_limits, principal.key_id, principal.tpm, tokens)


def send_charge_headers(charge: TokenCharge) -> None:
    """Add the ``x-ratelimit-*-tokens`` headers of a charge that was taken."""
    g.ratelimit_headers = {**g.get("ratelimit_headers", {}), **charge.headers}
