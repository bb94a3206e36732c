"""Redis with credentials and with TLS (issue 15): every Redis user of inferq works against an ACL
user with a password, and against ``rediss://`` verified with a CA file.

Each case starts its own redis-server (an ACL user whose default user is off; TLS only, no
plain port, with ``requirepass``), a scripted worker and the API under gunicorn, and runs a
stream and a ``/v1/jobs`` job through them: the Celery broker (API and worker), the pub/sub
subscriber, the Lua scripts (job records, quota, the brute-force gate), the rate limiter,
Flask-Limiter and the usage ledger. Flower, started on the same settings, reads the queues.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from config import Settings
from queueing import keys, liveness
from queueing.celery_app import make_celery
from queueing.connections import broker_settings, broker_tls, redis_client, tls_options
from queueing.subscriber import subscriber_for
from tests import sse_client
from tests.conftest import TEST_KEY, Process, add_key, base_env, free_port, wait_for

pytestmark = pytest.mark.timeout(240)

MODEL = "tls-model"
PASSWORD = "s3cret p@ss/word"  # characters a URL must quote
QUOTED = "s3cret%20p%40ss%2Fword"


@dataclass
class TLSFiles:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path  # a CA that did not sign the server's certificate


def _key_and_name(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Name]:
    return ec.generate_private_key(ec.SECP256R1()), x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                                    common_name)])


def _ca(directory: Path, name: str) -> tuple[Path, ec.EllipticCurvePrivateKey, x509.Certificate]:
    key, subject = _key_and_name(name)
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path = directory / f"{name}.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, cert


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A throwaway CA and a server certificate it signed for 127.0.0.1 and localhost."""
    directory = tmp_path_factory.mktemp("tls")
    ca_path, ca_key, ca_cert = _ca(directory, "inferq-test-ca")
    other_ca, _, _ = _ca(directory, "someone-else")
    key, subject = _key_and_name("localhost")
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return TLSFiles(ca_path, cert_path, key_path, other_ca)


@dataclass
class SecuredRedis:
    """A redis-server that needs credentials (and maybe TLS), and the settings that reach it."""

    url: str
    env: dict[str, str]  # what REDIS_URL and REDIS_CA_FILE a process gets

    def settings(self, **extra: object) -> Settings:
        return Settings(_env_file=None, **{k.lower(): v for k, v in {**self.env, **extra}.items()})  # type: ignore[arg-type]

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True,
                                    **tls_options(self.url, self.env.get("REDIS_CA_FILE", "")))


@pytest.fixture(scope="module", params=["acl-user", "tls"])
def secured(request: pytest.FixtureRequest, tls_files: TLSFiles,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredRedis]:
    workdir = tmp_path_factory.mktemp(f"redis-{request.param}")
    port = free_port()
    argv = ["redis-server", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)]
    if request.param == "acl-user":  # no default user: every client must name the user
        argv += ["--port", str(port), "--user", "default", "off", "--user", "inferq", "on", f">{PASSWORD}",
                 "~*", "&*", "+@all"]
        target = SecuredRedis(f"redis://inferq:{QUOTED}@127.0.0.1:{port}/0", {})
    else:  # TLS only (no plain port), and a password
        argv += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tls_files.cert),
                 "--tls-key-file", str(tls_files.key), "--tls-ca-cert-file", str(tls_files.ca),
                 "--tls-auth-clients", "no", "--requirepass", PASSWORD]
        target = SecuredRedis(f"rediss://:{QUOTED}@127.0.0.1:{port}/0", {"REDIS_CA_FILE": str(tls_files.ca)})
    target.env["REDIS_URL"] = target.url
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: target.client().ping(), 10, "redis-server", proc)
        yield target
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def stack(secured: SecuredRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A scripted worker and the API (gunicorn) on the secured Redis: the API's base URL and a key
    with limits (so the rate limiter and the quota script run for it)."""
    tmp = tmp_path_factory.mktemp("stack")
    env = base_env(secured.url, tmp, SERVED_MODEL_NAME=MODEL, ENGINE="scripted", FILES_DIR=str(tmp / "files"),
                   **secured.env)
    worker = Process([sys.executable, "-m", "inferq.cli", "worker"], env, tmp / "worker.log")
    port = free_port()
    api = Process([sys.executable, "-m", "inferq.cli", "api", "--host", "127.0.0.1", "--port", str(port),
                   "--workers", "1"], env, tmp / "api.log")
    base = f"http://127.0.0.1:{port}"
    client = secured.client()
    try:
        wait_for(lambda: liveness.live_models(client)[MODEL] > 0, 60, "worker", worker.proc)
        wait_for(lambda: httpx.get(f"{base}/ready", timeout=2).status_code == 200, 30, "API", api.proc)
        key, _ = add_key(env["DATABASE_URL"], rpm=1000, tpm=1_000_000, daily_tokens=1_000_000)
        yield base, key
    except BaseException:
        print(worker.log_tail(), api.log_tail(), sep="\n")
        raise
    finally:
        api.stop()
        worker.stop()


def test_the_server_refuses_clients_without_credentials_or_a_verified_certificate(
        secured: SecuredRedis, tls_files: TLSFiles) -> None:
    port = secured.url.rsplit(":", 1)[1].split("/")[0]
    if secured.url.startswith("rediss://"):
        with pytest.raises(redis.ConnectionError):  # plain TCP to a TLS port
            redis.Redis.from_url(f"redis://:{QUOTED}@127.0.0.1:{port}/0", socket_timeout=2).ping()
        # A CA that did not sign the server's certificate:
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            redis.Redis.from_url(secured.url, **tls_options(secured.url, str(tls_files.other_ca))).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(f"rediss://127.0.0.1:{port}/0", ssl_ca_certs=str(tls_files.ca)).ping()
    else:
        with pytest.raises(redis.AuthenticationError):  # the default user is off
            redis.Redis.from_url(f"redis://127.0.0.1:{port}/0").ping()


def test_celery_verifies_the_server_certificate(secured: SecuredRedis, tls_files: TLSFiles) -> None:
    """kombu connects to ``rediss://`` without verifying unless told: broker_use_ssl tells it."""
    good = make_celery(secured.settings())
    with good.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)
    if not secured.url.startswith("rediss://"):
        assert not good.conf.broker_use_ssl  # Celery's default (False): plain TCP
        return
    assert good.conf.broker_use_ssl["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    bad = make_celery(secured.settings(redis_ca_file=str(tls_files.other_ca)))
    with bad.connection_for_write() as conn, pytest.raises(Exception, match="certificate verify failed"):
        conn.ensure_connection(max_retries=1)


def test_a_stream_and_a_job_run_through_it(secured: SecuredRedis, stack: tuple[str, str]) -> None:
    base, key = stack
    auth = {"Authorization": f"Bearer {key}"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
    streamed = httpx.post(f"{base}/v1/chat/completions", headers=auth, json=body, timeout=30)
    assert streamed.status_code == 200, streamed.text
    assert streamed.headers["x-ratelimit-limit-requests"]  # the per-key limiter ran on this Redis
    assert sse_client.frames(streamed.text)[-1] == "[DONE]"
    assert sse_client.content(streamed.text).split() == ["tok0", "tok1", "tok2", "tok3", "tok4"]

    submitted = httpx.post(f"{base}/v1/jobs", headers=auth, timeout=30, json={
        "endpoint": "/v1/chat/completions", "body": {**body, "stream": False, "max_tokens": 3}})
    assert submitted.status_code == 202, submitted.text
    job = httpx.get(f"{base}/v1/jobs/{submitted.json()['id']}?wait=20", headers=auth, timeout=30).json()
    assert job["status"] == "succeeded", job

    wrong = httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer iq-wrong-key-000000000"},
                      timeout=10)
    assert wrong.status_code == 401  # counted by the brute-force gate's Lua script on this Redis
    assert httpx.get(f"{base}/health", timeout=10).status_code == 200  # Flask-Limiter's storage
    assert httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {TEST_KEY}"},
                     timeout=10).status_code == 200
    usage = httpx.get(f"{base}/v1/usage", headers=auth, timeout=10).json()  # the ledger drained the stream
    assert usage["today"]["requests"] == 2 and usage["daily_quota"]["used"] > 0, usage


def test_pubsub_and_limits_in_process(secured: SecuredRedis) -> None:
    """The shared subscriber copies the pool's connection options (password, TLS) to its own link."""
    from api.accounts.ratelimit import KeyRateLimiter

    settings = secured.settings()
    client = redis_client(settings)
    subscriber = subscriber_for(client)
    inbox = subscriber.subscribe(b"tls-check")
    client.publish("tls-check", "hello")
    assert inbox.get(5) == b"hello"
    assert KeyRateLimiter(settings).hit_request("tls-key", 10).allowed
    url, _ = broker_settings(settings)
    assert url == secured.url  # the password stays; no ssl_* parameters to strip here


def test_flower_reads_the_queues(secured: SecuredRedis, stack: tuple[str, str], tmp_path: Path) -> None:
    port = free_port()
    env = base_env(secured.url, tmp_path, SERVED_MODEL_NAME=MODEL, FLOWER_BASIC_AUTH="admin:flower-pw",
                   **secured.env)
    flower = Process([sys.executable, "-m", "inferq.cli", "flower", "--port", str(port)], env,
                     tmp_path / "flower.log")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{base}/healthcheck", timeout=2).status_code == 200, 30, "Flower",
                 flower.proc)
        # Flower reads queue lengths with its own Redis client (from broker_use_ssl for rediss://)
        queues = httpx.get(f"{base}/api/queues/length", auth=("admin", "flower-pw"), timeout=10)
        assert queues.status_code == 200, flower.log_tail()
        assert keys.model_queue(MODEL) in {q["name"] for q in queues.json()["active_queues"]}
    finally:
        flower.stop()


def test_tls_parameters_in_the_url() -> None:
    url = "rediss://:pw@redis.internal:6380/2?ssl_ca_certs=/etc/ca.pem&ssl_check_hostname=false"
    settings = Settings(_env_file=None, redis_url=url, redis_ca_file="/ignored/when/the/url/names/one.pem")
    required = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert tls_options(url, "/other.pem") == {**required, "ssl_ca_certs": "/etc/ca.pem",
                                              "ssl_check_hostname": False}
    assert broker_tls(settings) == tls_options(url)
    assert broker_settings(settings) == ("rediss://:pw@redis.internal:6380/2", {})
    assert tls_options("rediss://h/0", "/ca.pem") == {**required, "ssl_ca_certs": "/ca.pem"}
    assert tls_options("redis://h/0", "/ca.pem") == {} and broker_tls(Settings(_env_file=None)) is None


def test_the_api_serves_https_with_gunicorns_own_certificate(tls_files: TLSFiles, redis_url: str,
                                                           tmp_path: Path) -> None:
    """API TLS without a proxy: gunicorn's --certfile/--keyfile through GUNICORN_CMD_ARGS."""
    port = free_port()
    env = base_env(redis_url, tmp_path,
                   GUNICORN_CMD_ARGS=f"--certfile={tls_files.cert} --keyfile={tls_files.key}")
    api = Process([sys.executable, "-m", "inferq.cli", "api", "--host", "127.0.0.1", "--port", str(port),
                   "--workers", "1"], env, tmp_path / "api.log")
    base = f"https://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{base}/health", verify=str(tls_files.ca), timeout=2).is_success,
                 30, "the API over TLS", api.proc)
        models = httpx.get(f"{base}/v1/models", verify=str(tls_files.ca), timeout=5,
                           headers={"Authorization": f"Bearer {TEST_KEY}"})
        assert models.status_code == 200, models.text
        with pytest.raises(httpx.HTTPError):  # a client that does not trust the CA
            httpx.get(f"{base}/health", verify=str(tls_files.other_ca), timeout=5)
        with pytest.raises(httpx.HTTPError):  # nor is plain HTTP answered on that port
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        api.stop()
