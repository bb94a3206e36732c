"""Property tests (hypothesis) for the reserve / adjust / settle arithmetic, on real Redis."""

from __future__ import annotations

import secrets

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from queueing import jobs, keys, metering
from queueing.jobs import CHAT, JobRecord, JobRequest, JobStatus

TTL = 600
REQUEST = JobRequest(CHAT, "m", {"model": "m", "messages": [{"role": "user", "content": "hi"}]})

# One job: (worst case reserved at admission, exact worst case at the worker,
# tokens actually used (a share of the exact worst case), how it ends).
job_plans = st.tuples(
    st.integers(1, 400),
    st.integers(1, 400),
    st.floats(0, 1),
    st.sampled_from([JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, "cancel-queued"]),
)


def _new_job(key_id: str, day: str, limit: int, reserve: int) -> JobRecord:
    return JobRecord(id=jobs.new_job_id(), request=REQUEST,
                     key_id=key_id, quota_key=keys.quota(key_id, day), quota_day=day,
                     quota_limit=limit, reserved_tokens=reserve)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limit=st.integers(0, 1500), plans=st.lists(job_plans, min_size=1, max_size=12),
       interleave=st.booleans())
def test_quota_never_overshoots_and_settles_exactly(redis_client, limit, plans, interleave):
    key_id, day = f"prop-{secrets.token_hex(6)}", metering.quota_day()
    counter = keys.quota(key_id, day)
    admitted: list[tuple[JobRecord, tuple]] = []
    for plan in plans:
        record = _new_job(key_id, day, limit, plan[0])
        try:
            jobs.create(redis_client, record, TTL, seed_used=0)
        except jobs.QuotaExceeded as exc:
            assert exc.used + exc.reserved + plan[0] > limit
            continue
        admitted.append((record, plan))
        if not interleave:
            _run_to_end(redis_client, record, plan)
        _check_bounds(redis_client, counter, limit)
    if interleave:
        for record, plan in admitted:
            _run_to_end(redis_client, record, plan)
            _check_bounds(redis_client, counter, limit)

    state = redis_client.hgetall(counter) or {"used": "0", "reserved": "0"}
    settled = [jobs.get(redis_client, r.id) for r, _ in admitted]
    assert int(state["reserved"]) == 0
    assert int(state["used"]) == sum((r.prompt_tokens or 0) + (r.completion_tokens or 0) for r in settled)
    assert int(state["used"]) <= limit
    assert all(r.reserved_tokens == 0 and r.status.is_terminal for r in settled)


def _run_to_end(client, record: JobRecord, plan: tuple) -> None:
    _, exact, share, end = plan
    if end == "cancel-queued":
        assert jobs.request_cancel(client, record.id, TTL) is JobStatus.QUEUED
        return
    jobs.transition(client, record.id, JobStatus.RUNNING, TTL, model="m", worker="w")
    if not metering.adjust_reservation(client, record.id, exact):
        jobs.transition(client, record.id, JobStatus.FAILED, TTL, prompt_tokens=0, completion_tokens=0)
        return
    used = int(exact * share)
    prompt = min(used, exact // 2)
    jobs.transition(client, record.id, end, TTL, prompt_tokens=prompt, completion_tokens=used - prompt)


def _check_bounds(client, counter: str, limit: int) -> None:
    state = client.hgetall(counter)
    if state:
        assert int(state["used"]) + int(state["reserved"]) <= limit
        assert int(state["reserved"]) >= 0
