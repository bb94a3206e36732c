"""Redis clients, one pool per Redis target per process: the one place that builds them.

A target is either the one server at ``REDIS_URL`` or, with ``REDIS_SENTINELS`` set, the
current primary of ``REDIS_SENTINEL_MASTER`` as the sentinels name it (redis-py's own
Sentinel support: every new connection asks them, and a connection to a primary that
died or was demoted is replaced by one to the new primary). The Celery broker's URL and
transport options (:func:`broker_settings`) and the rate limiter's pool come from here too.

A ``rediss://`` URL means TLS for every one of them, with the server's certificate verified
against ``REDIS_CA_FILE`` (or the URL's ``ssl_ca_certs``; else the system's CAs):
:func:`tls_options` gives the options, :func:`broker_tls` the Celery broker's (and Flower's).
"""

from __future__ import annotations

import functools
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

from config import Settings

#: Commands only: open streams share one pub/sub connection per process
#: (``queueing.subscriber``), so this bounds concurrent commands, i.e. greenlets
#: talking to Redis at once (redis-py's default cap of 100 is too low for a gevent
#: worker with hundreds of open streams, each checking its job now and then).
MAX_CONNECTIONS = 10_000

_POOL_OPTIONS: dict[str, Any] = {"max_connections": MAX_CONNECTIONS, "health_check_interval": 30,
                                 "socket_connect_timeout": 2}
#: Seconds a sentinel may take to answer (one that does not is skipped for the next).
SENTINEL_TIMEOUT = 1.0

T = TypeVar("T")


@dataclass(frozen=True)
class RedisTarget:
    """Where a process's Redis is: a URL, or sentinels and the name of their primary."""

    url: str
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = ""
    sentinel_password: str | None = None
    password: str | None = None
    failover_timeout: float = 20.0
    ca_file: str = ""

    @classmethod
    def of(cls, settings: Settings) -> RedisTarget:
        return cls(settings.redis_url, tuple(settings.sentinel_addresses), settings.redis_sentinel_master,
                   settings.redis_sentinel_password or None,
                   settings.redis_password or urlsplit(settings.redis_url).password or None,
                   settings.redis_failover_timeout, settings.redis_ca_file)

    @property
    def db(self) -> int:
        """The database number: ``REDIS_URL``'s path (``/0``)."""
        path = urlsplit(self.url).path.strip("/")
        return int(path) if path.isdigit() else 0


class FailoverRetry(Retry):
    """Retry connection errors for up to ``budget`` seconds from the first one.

    Long enough for the sentinels to notice a dead primary and promote a replica: a
    command (a worker recording a job's end, say) waits for the new primary instead of
    failing. redis-py's own ``Retry`` counts attempts, and a connect retried inside a
    retried command multiplies them; a deadline bounds both.
    """

    def __init__(self, budget: float):
        super().__init__(ExponentialWithJitterBackoff(base=0.05, cap=0.5), -1)
        self.budget = budget

    def call_with_retry(self, do: Callable[[], T], fail: Callable[..., Any],
                        is_retryable: Callable[[Exception], bool] | None = None,
                        with_failure_count: bool = False) -> T:
        self._backoff.reset()
        failures, deadline = 0, None
        while True:
            try:
                return do()
            except self._supported_errors as error:
                if is_retryable and not is_retryable(error):
                    raise
                failures += 1
                fail(error, failures) if with_failure_count else fail(error)
                now = time.monotonic()
                deadline = deadline or now + self.budget
                if now >= deadline:
                    raise
                time.sleep(min(self._backoff.compute(failures), deadline - now))


class PrimaryConnection(SentinelManagedConnection):
    """A Sentinel-managed connection that asks the sentinels for the primary on every connect.

    redis-py's asks them in ``connect()``, but a command or pipeline sent on a connection
    that was dropped reconnects it through ``connect_check_health()``, to the address it
    had: a dead primary's, retried until the budget runs out. Resolving the address in
    ``_connect()`` (the socket's connect, which both paths reach) follows the failover.
    """

    def _connect(self) -> socket.socket:
        self.host, self.port = self.connection_pool.get_master_address()
        return super()._connect()


class PrimarySSLConnection(PrimaryConnection, redis.SSLConnection):
    """:class:`PrimaryConnection` over TLS (``rediss://`` in ``REDIS_URL``)."""


def redis_client(settings: Settings, decode_responses: bool = True) -> redis.Redis:
    """This process's shared client for the Redis that ``settings`` name."""
    return _client(RedisTarget.of(settings), decode_responses)


def get_redis(url: str) -> redis.Redis:
    """A shared client for the one server at ``url`` that returns ``str`` values."""
    return _client(RedisTarget(url), True)


@functools.lru_cache(maxsize=16)
def _client(target: RedisTarget, decode_responses: bool) -> redis.Redis:
    tls = tls_options(target.url, target.ca_file)
    if not target.sentinels:
        return redis.Redis.from_url(target.url, decode_responses=decode_responses, password=target.password,
                                    retry_on_timeout=True, **_POOL_OPTIONS, **tls)
    return _sentinel(target).master_for(
        target.master, decode_responses=decode_responses, db=target.db, password=target.password,
        username=urlsplit(target.url).username, retry=FailoverRetry(target.failover_timeout),
        connection_class=PrimarySSLConnection if tls else PrimaryConnection, **_POOL_OPTIONS, **tls)


@functools.lru_cache(maxsize=4)
def _sentinel(target: RedisTarget) -> Sentinel:
    """The sentinels of ``target``, asked with short timeouts and no retries (the next one answers)."""
    return Sentinel(list(target.sentinels), sentinel_kwargs={
        "password": target.sentinel_password, "socket_timeout": SENTINEL_TIMEOUT,
        "socket_connect_timeout": SENTINEL_TIMEOUT, "retry": Retry(NoBackoff(), 0)})


def master_address(client: redis.Redis) -> tuple[str, int] | None:
    """The address of the primary that a Sentinel-managed ``client`` talks to now, asked
    of the sentinels (``redis.ConnectionError`` if none names one); ``None`` for a client
    of one fixed server."""
    pool = client.connection_pool
    get = getattr(pool, "get_master_address", None)
    return None if get is None else tuple(get())


def broker_settings(settings: Settings) -> tuple[str, dict[str, Any]]:
    """Celery's broker URL and the transport options that go with it (Flower reads both).

    With sentinels: kombu's ``sentinel://`` transport, one URL per sentinel joined by ``;``,
    the primary's name and the sentinels' password as transport options.
    """
    target = RedisTarget.of(settings)
    if not target.sentinels:  # TLS parameters go to Celery as broker_use_ssl (broker_tls), for Flower too
        return _with_password(_without_tls_params(target.url), target.password), {}
    user = urlsplit(target.url).username or ""
    auth = f"{quote(user, safe='')}:{quote(target.password, safe='')}@" if target.password else ""
    url = ";".join(f"sentinel://{auth}{host}:{port}/{target.db}" for host, port in target.sentinels)
    sentinel_kwargs: dict[str, Any] = {"socket_timeout": SENTINEL_TIMEOUT,
                                       "socket_connect_timeout": SENTINEL_TIMEOUT}
    if target.sentinel_password:
        sentinel_kwargs["password"] = target.sentinel_password
    return url, {"master_name": target.master, "sentinel_kwargs": sentinel_kwargs}


def _with_password(url: str, password: str | None) -> str:
    """``url`` with ``password`` in it, unless it holds one already (or there is none)."""
    parts = urlsplit(url)
    if not password or parts.password or not parts.hostname:
        return url
    netloc = f"{quote(parts.username or '', safe='')}:{quote(password, safe='')}@{parts.netloc}"
    return parts._replace(netloc=netloc).geturl()



#: The TLS parameters a ``rediss://`` URL may carry (redis-py's names, as in its own URLs).
TLS_PARAMS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def tls_options(url: str, ca_file: str = "") -> dict[str, Any]:
    """redis-py's TLS options for ``url`` (none unless it is ``rediss://``): its ``ssl_*``
    parameters, the server's certificate required and checked against ``ca_file`` unless the
    URL names a CA itself."""
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return {}
    given = {name: value for name, value in parse_qsl(parts.query) if name in TLS_PARAMS}
    options: dict[str, Any] = {"ssl_cert_reqs": _CERT_REQS.get(given.pop("ssl_cert_reqs", "required").lower(),
                                                               ssl.CERT_REQUIRED)}
    if "ssl_check_hostname" in given:
        options["ssl_check_hostname"] = given.pop("ssl_check_hostname").lower() not in ("false", "0", "no")
    options.update(given)
    if ca_file and "ssl_ca_certs" not in options:
        options["ssl_ca_certs"] = ca_file
    return options


def broker_tls(settings: Settings) -> dict[str, Any] | None:
    """Celery's ``broker_use_ssl`` for a ``rediss://`` REDIS_URL (``None`` otherwise).

    Without it kombu connects to ``rediss://`` *without verifying the certificate*, and
    Flower's broker view refuses the URL.
    """
    return tls_options(settings.redis_url, settings.redis_ca_file) or None


def _without_tls_params(url: str) -> str:
    """``url`` without its ``ssl_*`` parameters (the broker takes them as :func:`broker_tls`)."""
    parts = urlsplit(url)
    kept = [(name, value) for name, value in parse_qsl(parts.query) if name not in TLS_PARAMS]
    return parts._replace(query=urlencode(kept)).geturl() if kept or parts.query else url
