"""A batch's status and the moves between statuses (OpenAI's batch lifecycle).

Only :meth:`api.batches.store.BatchStore.transition` writes a batch's status: it makes a
move of :data:`TRANSITIONS` in one ``UPDATE`` that also sets the time the batch entered
its new status (:data:`ENTERED_AT`).
"""

from __future__ import annotations

import enum


class BatchStatus(enum.StrEnum):
    """A batch's status; the values are OpenAI's."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def has_ended(self) -> bool:
        """Whether no move leaves this status."""
        return not TRANSITIONS[self]


#: Allowed ``from -> {to}`` moves; a batch that ended has none. Expiry wins over a cancel
#: (cancelling takes no lease), and a batch whose dispatch broke fails from any status
#: that has not ended.
TRANSITIONS: dict[BatchStatus, frozenset[BatchStatus]] = {
    BatchStatus.VALIDATING: frozenset({BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING, BatchStatus.EXPIRED,
                                       BatchStatus.FAILED}),
    BatchStatus.IN_PROGRESS: frozenset({BatchStatus.FINALIZING, BatchStatus.CANCELLING, BatchStatus.EXPIRED,
                                        BatchStatus.FAILED}),
    BatchStatus.FINALIZING: frozenset({BatchStatus.COMPLETED, BatchStatus.FAILED}),
    BatchStatus.CANCELLING: frozenset({BatchStatus.CANCELLED, BatchStatus.EXPIRED, BatchStatus.FAILED}),
    BatchStatus.COMPLETED: frozenset(),
    BatchStatus.FAILED: frozenset(),
    BatchStatus.EXPIRED: frozenset(),
    BatchStatus.CANCELLED: frozenset(),
}

#: The column that holds when a batch entered each status (``validating``'s is
#: ``created_at``, set when the batch is stored).
ENTERED_AT: dict[BatchStatus, str] = {
    BatchStatus.IN_PROGRESS: "in_progress_at",
    BatchStatus.FINALIZING: "finalizing_at",
    BatchStatus.COMPLETED: "completed_at",
    BatchStatus.FAILED: "failed_at",
    BatchStatus.EXPIRED: "expired_at",
    BatchStatus.CANCELLING: "cancelling_at",
    BatchStatus.CANCELLED: "cancelled_at",
}

#: Statuses of a batch that has not ended (being dispatched, collected or finalized, or orphaned).
RUNNING = tuple(status for status in BatchStatus if not status.has_ended)
#: Statuses a batch may be dispatched, cancelled or expired in.
OPEN = (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)


def allowed_sources(target: BatchStatus) -> tuple[BatchStatus, ...]:
    """Statuses from which ``target`` may be reached."""
    return tuple(source for source, targets in TRANSITIONS.items() if target in targets)
