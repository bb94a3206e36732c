"""One pub/sub connection per process, shared by every open subscription.

A :class:`Subscriber` (one per Redis server per process: :func:`subscriber_for`)
holds a single connection in subscribe mode and a daemon reader thread that
routes each message, by channel, to the :class:`Inbox` of whoever subscribed to
it. Under gunicorn's gevent worker ``threading`` is patched, so the reader is a
greenlet and every wait below is cooperative; elsewhere it is a real thread.

Payloads stay ``bytes`` and are not decoded here: the reader only parses the
reply (:mod:`queueing.pubsub_replies`), looks the channel up and queues, a few
microseconds a message; the consumer decodes.

If the connection breaks (Redis restarted, or silent for ``2 * SILENCE`` seconds
despite a PING), every inbox open on it fails at once: its queued messages are
still delivered, then it raises ``redis.ConnectionError`` (tokens published
meanwhile are lost, so a stream cannot carry on). The connection is not reopened
in the background: the next subscription opens a new one, so a dead Redis costs
nothing while nobody asks. An inbox must be closed (``EventSubscription`` is a
context manager): until then its channel stays subscribed and routed to it.
Closing stops the routing at once; the UNSUBSCRIBE itself waits (at most
``UNSUBSCRIBE_DELAY``) to go out with the next SUBSCRIBE or with the others
that closed meanwhile, one command for many channels: a streaming API closes
one subscription per request, and a write to the socket costs more than the
command.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from queueing.pubsub_replies import ReplyReader

#: Connection settings a subscriber does not inherit from the client's pool: they
#: belong to that pool (maintenance handlers) or to command/response connections.
_NOT_INHERITED = ("maint_notifications_pool_handler", "maint_notifications_config", "orig_host_address",
                  "orig_socket_timeout", "orig_socket_connect_timeout", "himport_registry")

#: Seconds without a byte from Redis before the reader PINGs it; as long again without an
#: answer and the connection counts as broken (a frozen server or a lost network).
SILENCE = 5.0

#: Longest wait of a closed channel's UNSUBSCRIBE for company (seconds); until then Redis still
#: sends its messages, and the reader drops them.
UNSUBSCRIBE_DELAY = 0.1

_ADDRESS = ("host", "port", "path", "db", "username", "password")  # what makes two clients' servers one

_FAILED = object()  # queued after an inbox's last message when its connection broke
_WAKE = object()  # queued by Inbox.wake: the consumer returns from its wait with nothing


class Inbox:
    """One subscription's messages (raw payloads, in order), as the reader delivers them."""

    __slots__ = ("channel", "put", "enqueue", "_queue", "_settled", "_failure", "_link")

    def __init__(self, channel: bytes, link: _Link):
        self.channel = channel
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        #: Queue a payload for :meth:`get` (what the reader does with each, unless diverted).
        self.enqueue: Callable[[bytes], None] = self._queue.put
        self.put: Callable[[bytes], None] = self.enqueue  # the reader's whole per-message work, bound once
        self._settled = threading.Event()  # confirmed by Redis, or failed
        self._failure: BaseException | None = None
        self._link = link

    def get(self, timeout: float) -> bytes | None:
        """The next payload, or ``None`` if none arrives within ``timeout`` seconds.

        Raises ``redis.ConnectionError`` once the queued payloads are exhausted if the
        connection broke.
        """
        try:
            item = self._queue.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None
        if item is _FAILED:
            self._raise()
        return None if item is _WAKE else item

    def get_all(self, timeout: float) -> list[bytes]:
        """Every queued payload (waiting up to ``timeout`` for the first), or ``[]``."""
        first = self.get(timeout)
        if first is None:
            return []
        items = [first]
        q = self._queue
        while not q.empty():
            item = q.get_nowait()
            if item is _FAILED:  # raise on the next call, after these are handled
                q.put(item)
                break
            if item is not _WAKE:
                items.append(item)
        return items

    def divert(self, handler: Callable[[bytes], None] | None) -> None:
        """Have the reader hand each later payload to ``handler`` instead of queueing it
        (``None``: queue them again). The handler runs on the reader, which serves every
        subscription of the process: it must not block or raise, and it queues with
        :attr:`enqueue` what it does not take itself.
        """
        self.put = self.enqueue if handler is None else handler

    def wake(self) -> None:
        """End a wait in :meth:`get` / :meth:`get_all` now (it returns nothing)."""
        self._queue.put(_WAKE)

    def close(self) -> None:
        """Stop receiving; the channel is unsubscribed when its last inbox closes."""
        self._link.remove(self)

    def _confirm(self) -> None:
        self._settled.set()

    def _fail(self, exc: BaseException) -> None:
        self._failure = exc
        self._queue.put(_FAILED)
        self._settled.set()

    def _wait_confirmed(self, timeout: float) -> None:
        if not self._settled.wait(timeout):
            raise redis.TimeoutError("pub/sub subscription not confirmed")
        if self._failure is not None:
            self._raise()

    def _raise(self) -> None:
        self._queue.put(_FAILED)  # and on every later call
        raise redis.ConnectionError("lost the pub/sub connection to Redis") from self._failure


class _Link:
    """One subscribe-mode connection, its reader thread and its routing table."""

    def __init__(self, connection: redis.connection.AbstractConnection):
        self._connection = connection
        self._lock = threading.Lock()  # commands sent, table changes, breaking
        self._routes: dict[bytes, list[Inbox]] = {}  # lists replaced, never mutated: the reader iterates them
        self._unanswered: dict[bytes, int] = {}  # SUBSCRIBEs sent per channel, not yet confirmed
        self._leaving: set[bytes] = set()  # closed channels whose UNSUBSCRIBE is not sent yet
        self._flush_timer: threading.Timer | None = None
        self.broken = False
        connection.connect()
        threading.Thread(target=self._read, name="inferq-pubsub", daemon=True).start()

    def add(self, inbox: Inbox) -> None:
        """Route ``inbox``'s channel to it, subscribing if it is new."""
        channel = inbox.channel
        with self._lock:
            if self.broken:
                raise redis.ConnectionError("the pub/sub connection to Redis is broken")
            inboxes = self._routes.get(channel)
            self._routes[channel] = [inbox] if inboxes is None else [*inboxes, inbox]
            if inboxes is None and channel in self._leaving:  # never unsubscribed: still subscribed
                self._leaving.discard(channel)
                if channel not in self._unanswered:
                    inbox._confirm()
            elif inboxes is None:
                self._send(*self._unsubscribe_leaving(), ("SUBSCRIBE", channel))
                self._unanswered[channel] = self._unanswered.get(channel, 0) + 1
            elif channel not in self._unanswered:
                inbox._confirm()  # already subscribed, and confirmed

    def remove(self, inbox: Inbox) -> None:
        """Stop routing to ``inbox``; unsubscribe its channel if no one else listens."""
        channel = inbox.channel
        with self._lock:
            inboxes = self._routes.get(channel, [])
            if inbox not in inboxes:
                return
            rest = [other for other in inboxes if other is not inbox]
            if rest:
                self._routes[channel] = rest
                return
            del self._routes[channel]
            if not self.broken:
                self._leaving.add(channel)
                if self._flush_timer is None:
                    self._flush_timer = threading.Timer(UNSUBSCRIBE_DELAY, self.flush)
                    self._flush_timer.daemon = True
                    self._flush_timer.start()

    def flush(self) -> None:
        """Send the UNSUBSCRIBE of every channel closed since the last one."""
        with self._lock:
            self._flush_timer = None
            if self.broken or not self._leaving:
                return
            try:
                self._send(*self._unsubscribe_leaving())
            except redis.ConnectionError:
                pass  # the link is broken now; nothing left to unsubscribe

    def _unsubscribe_leaving(self) -> list[tuple[Any, ...]]:
        """The one UNSUBSCRIBE of the channels closed meanwhile (none if none), now sent with
        whatever goes next (with the lock held)."""
        if not self._leaving:
            return []
        leaving, self._leaving = self._leaving, set()
        return [("UNSUBSCRIBE", *leaving)]

    def _send(self, *commands: tuple[Any, ...]) -> None:
        """Send commands in one write (with the lock held); a failure breaks the link."""
        if self.broken:  # never let redis-py reconnect a connection this link dropped
            raise redis.ConnectionError("the pub/sub connection to Redis is broken")
        if not commands:
            return
        connection = self._connection
        try:
            connection.send_packed_command(connection.pack_commands(commands), check_health=False)
        except Exception as exc:
            self._break(exc)
            raise redis.ConnectionError("lost the pub/sub connection to Redis") from exc

    def _read(self) -> None:
        # redis-py connected and shook hands; its socket is read directly (see pubsub_replies).
        read, route = ReplyReader(self._connection._sock).read, self._routes.get  # type: ignore[arg-type]
        silent = False
        try:
            while True:
                try:
                    replies = read()
                except TimeoutError:  # SILENCE seconds without a byte: is Redis still there?
                    if silent:
                        raise
                    silent = True
                    with self._lock:
                        self._send(("PING",))
                    continue
                silent = False
                for reply in replies:
                    if reply[0] == b"message":
                        inboxes = route(reply[1])
                        if inboxes is not None:  # else: nobody listens any more; drop it
                            for inbox in inboxes:
                                inbox.put(reply[2])
                    elif reply[0] == b"subscribe":
                        self._confirmed(reply[1])
        except Exception as exc:  # noqa: BLE001 - whatever ends the reads ends the link
            with self._lock:
                self._break(exc)

    def _confirmed(self, channel: bytes) -> None:
        with self._lock:
            left = self._unanswered.pop(channel, 1) - 1
            if left > 0:  # a later SUBSCRIBE (after an UNSUBSCRIBE) is still unanswered
                self._unanswered[channel] = left
                return
            for inbox in self._routes.get(channel, []):
                inbox._confirm()

    def _break(self, exc: BaseException) -> None:
        """Fail every inbox and drop the connection (with the lock held)."""
        if self.broken:
            return
        self.broken = True
        routes, self._routes = self._routes, {}
        self._connection.disconnect()  # wakes the reader if a sender broke the link
        for inboxes in routes.values():
            for inbox in inboxes:
                inbox._fail(exc)


class Subscriber:
    """Subscriptions of one process to one Redis server, over one connection at a time."""

    def __init__(self, connection_class: Callable[..., redis.connection.AbstractConnection], **kwargs: Any):
        self._connection_class = connection_class
        self._kwargs = kwargs
        self._lock = threading.Lock()
        self._link: _Link | None = None

    def subscribe(self, channel: bytes, timeout: float = 5.0) -> Inbox:
        """An inbox for ``channel``, returned once Redis has confirmed the subscription
        (``redis.TimeoutError`` if it does not within ``timeout`` seconds)."""
        return self.start_subscribe(channel).confirmed(timeout)

    def start_subscribe(self, channel: bytes) -> PendingInbox:
        """Send the subscription to ``channel`` without waiting for Redis to confirm it:
        the caller does other round trips meanwhile, then waits with
        :meth:`PendingInbox.confirmed` (or closes it)."""
        link, fresh = self._live_link()
        try:
            return PendingInbox(self, channel, self._add(link, channel), fresh)
        except redis.ConnectionError:
            if fresh:
                raise
        link, _ = self._live_link()  # the connection broke before it had noticed: a new one
        return PendingInbox(self, channel, self._add(link, channel), True)

    @staticmethod
    def _add(link: _Link, channel: bytes) -> Inbox:
        inbox = Inbox(channel, link)
        link.add(inbox)
        return inbox

    def _live_link(self) -> tuple[_Link, bool]:
        """The open link, or a new one (then ``True``)."""
        with self._lock:
            if self._link is not None and not self._link.broken:
                return self._link, False
            self._link = None
            self._link = _Link(self._connection_class(**self._kwargs))
            return self._link, True


class PendingInbox:
    """A subscription sent to Redis and not yet confirmed (:meth:`Subscriber.start_subscribe`)."""

    def __init__(self, subscriber: Subscriber, channel: bytes, inbox: Inbox, fresh: bool):
        self._subscriber, self._channel, self._inbox, self._fresh = subscriber, channel, inbox, fresh

    def confirmed(self, timeout: float = 5.0) -> Inbox:
        """The inbox once Redis has confirmed it (``redis.TimeoutError`` if it does not
        within ``timeout`` seconds); closed on any failure."""
        deadline = time.monotonic() + timeout
        try:
            self._inbox._wait_confirmed(timeout)
            return self._inbox
        except redis.ConnectionError:
            self._inbox.close()
            if self._fresh:
                raise
        except BaseException:
            self._inbox.close()
            raise
        # The connection broke before it had noticed (Redis restarted just now). A
        # subscription that was not confirmed lost nothing: once more, on a new one.
        link, _ = self._subscriber._live_link()
        self._inbox = self._subscriber._add(link, self._channel)
        self._fresh = True
        return self.confirmed(max(deadline - time.monotonic(), 0.0))

    def close(self) -> None:
        """Give the subscription up (confirmed or not)."""
        self._inbox.close()


_subscribers: dict[tuple[Any, ...], Subscriber] = {}
_subscribers_lock = threading.Lock()


def subscriber_for(client: redis.Redis) -> Subscriber:
    """This process's subscriber to the server ``client`` talks to (made on first use,
    and again in a forked child, which must not share its parent's connection)."""
    pool = client.connection_pool
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if k not in _NOT_INHERITED}
    sentinels = kwargs.pop("connection_pool", None)  # a Sentinel-managed pool's: it names the primary
    address = (pool.connection_class, sentinels, *(kwargs.get(k) for k in _ADDRESS))
    subscriber = _subscribers.get(address)
    if subscriber is None:
        with _subscribers_lock:
            subscriber = _subscribers.get(address)
            if subscriber is None:
                kwargs.update(decode_responses=False, protocol=2, health_check_interval=0,
                              socket_timeout=SILENCE)
                connect: Callable[..., redis.connection.AbstractConnection] = pool.connection_class
                if sentinels is not None:
                    connect = functools.partial(_to_primary, sentinels, pool.connection_class)
                subscriber = _subscribers[address] = Subscriber(connect, **kwargs)
    return subscriber


def _to_primary(sentinels: Any, managed: type[redis.Connection], **kwargs: Any) -> redis.Connection:
    """A plain connection to the primary the sentinels name now (``redis.ConnectionError`` if
    none): a Sentinel-managed connection needs its pool, and each new link (the first, or the
    next one after a break) asks again, so a failover is followed. It does not retry: a dead
    primary's address is not worth retrying (the sentinels name the next one), and the
    subscriber's lock is held while it connects."""
    host, port = sentinels.get_master_address()
    plain = redis.SSLConnection if issubclass(managed, redis.SSLConnection) else redis.Connection
    return plain(**{**kwargs, "host": host, "port": port, "retry": Retry(NoBackoff(), 0)})


def _forget_after_fork() -> None:
    global _subscribers_lock
    _subscribers.clear()  # the parent's reader threads do not exist here
    _subscribers_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
