"""Relaying a stream's deltas from the pub/sub reader straight to the client.

While a :class:`Relay` is on, the subscriber's reader hands each of the job's raw
events to :meth:`Relay.take` instead of queueing it: a delta's frames are written
to the client's socket at once (:class:`api.http.socket_writer.ChunkWriter`, never
blocking), so the stream's greenlet does not wake per token. Anything else, and
everything from the moment the relay cannot go on, is queued for the stream's
greenlet as before, in order:

- a terminal event (or a malformed one): queued; the greenlet ends the stream;
- a chunk the socket's buffer did not take whole: the relay goes off and wakes the
  greenlet, which writes the rest waiting for the client (:meth:`Relay.catch_up`)
  and turns the relay on again once nothing is queued;
- the client gone (the write failed): the relay goes off and wakes the greenlet,
  which raises that error, as gunicorn's own write would have.

The reader and the stream's greenlet are greenlets of one thread, so a relay is
switched on and off between two writes, never during one.
"""

from __future__ import annotations

from api.http import metrics
from api.http.socket_writer import ChunkWriter
from queueing import events
from queueing.channel import EventSubscription


class Relay:
    """One stream's relay from its subscription to its client's socket."""

    __slots__ = ("_subscription", "_writer", "_on", "_failure", "tokens", "deltas")

    def __init__(self, subscription: EventSubscription, writer: ChunkWriter):
        self._subscription = subscription
        self._writer = writer
        self._on = False
        self._failure: Exception | None = None
        #: Tokens and deltas relayed so far (the stream counts them as its own).
        self.tokens = 0
        self.deltas = 0

    def catch_up(self) -> None:
        """On the stream's greenlet, before it reads its queue: raise the client's
        failure, or write what the socket did not take (waiting for the client)."""
        if self._failure is not None:
            raise self._failure
        self._writer.flush()

    def resume(self) -> None:
        """Take the deltas on the reader again (call with nothing queued or unwritten)."""
        if not self._on and self._failure is None:
            self._on = True
            self._subscription.divert(self.take)

    def take(self, raw: bytes) -> None:
        """The reader's handler for each raw event of the job while the relay is on."""
        try:
            parts = events.delta_parts(raw)
        except events.EventDecodeError:
            parts = None  # the stream's greenlet raises it, in order
        if parts is None:
            self.stop()
            self._subscription.enqueue(raw)
            return
        self.tokens += parts[0]
        self.deltas += 1
        if not parts[1]:  # progress: tokens, nothing to send
            return
        try:
            if self._writer.try_write(parts[1]):
                return
            metrics.STREAM_RELAY.labels("stalled").inc()
        except Exception as exc:  # noqa: BLE001 - the client is gone (OSError): the greenlet raises it
            self._failure = exc
        self.stop()
        self._subscription.wake()

    def stop(self) -> None:
        """Queue every later event for the stream's greenlet again."""
        if self._on:
            self._on = False
            self._subscription.divert(None)

    @property
    def on(self) -> bool:
        """Whether the reader takes the deltas now."""
        return self._on
