"""Flower under ``inferq run`` (issue 15, M1): loopback by default, credentials when bound elsewhere."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import httpx
import psutil
import pytest
from click.testing import CliRunner

from config import Settings
from inferq.cli import flower_command, is_loopback
from tests.conftest import ROOT, Process, base_env, free_port, wait_for

pytestmark = pytest.mark.timeout(120)


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


def test_flower_binds_loopback_by_default() -> None:
    argv, env = flower_command(settings())
    assert "--address=127.0.0.1" in argv and "--port=5555" in argv and env == {}
    assert not any(arg.startswith("--basic-auth") for arg in argv)


def test_flower_elsewhere_needs_credentials_which_stay_off_its_command_line() -> None:
    with pytest.raises(click.ClickException, match="FLOWER_BASIC_AUTH=user:password"):
        flower_command(settings(flower_address="0.0.0.0"))
    with pytest.raises(click.ClickException, match="every interface"):
        flower_command(settings(flower_address=""))
    argv, env = flower_command(settings(flower_address="0.0.0.0", flower_basic_auth="ops:pw1,dev:pw2"))
    assert "--address=0.0.0.0" in argv and env == {"FLOWER_BASIC_AUTH": "ops:pw1,dev:pw2"}
    assert not any("pw1" in arg for arg in argv)  # `ps` shows a command line to every local user
    argv, _ = flower_command(settings(flower_address="10.0.0.5"), 7000, ("--basic-auth=ops:pw",))
    assert argv[-2:] == ["--port=7000", "--basic-auth=ops:pw"]
    with pytest.raises(click.ClickException, match="FLOWER_ADDRESS, not --address"):
        flower_command(settings(), None, ("--address=0.0.0.0",))
    assert all(map(is_loopback, ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost")))
    assert not any(map(is_loopback, ("0.0.0.0", "", "::", "10.0.0.5", "flower.example.com")))


def test_inferq_run_refuses_a_public_flower_before_starting_anything(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from config import get_settings
    from inferq import stack

    monkeypatch.chdir(tmp_path)
    for name, value in {"FLOWER_ADDRESS": "0.0.0.0", "ENGINE": "scripted", "API_KEYS": "iq-" + "k" * 30,
                        "REDIS_URL": "redis://127.0.0.1:1/0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("FLOWER_BASIC_AUTH", raising=False)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(stack.run, ["--procfile", str(ROOT / "Procfile")], catch_exceptions=False)
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1 and "FLOWER_BASIC_AUTH" in result.output, result.output
    assert not (tmp_path / "data").exists()  # no private Redis was started, nothing written


def _listening(pid: int) -> set[str]:
    process = psutil.Process(pid)
    found = set()
    for proc in [process, *process.children(recursive=True)]:
        found |= {c.laddr.ip for c in proc.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    return found


def test_real_flower_listens_on_loopback_and_asks_for_credentials_elsewhere(redis_url: str,
                                                                            tmp_path: Path) -> None:
    port = free_port()
    local = Process([sys.executable, "-m", "inferq.cli", "flower", "--port", str(port)],
                    base_env(redis_url, tmp_path), tmp_path / "flower-local.log")
    try:
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/healthcheck", timeout=2).is_success, 30,
                 "Flower", local.proc)
        assert _listening(local.proc.pid) == {"127.0.0.1"}
    finally:
        local.stop()

    public_env = base_env(redis_url, tmp_path, FLOWER_ADDRESS="0.0.0.0")
    refused = Process([sys.executable, "-m", "inferq.cli", "flower"], public_env, tmp_path / "refused.log")
    assert refused.proc.wait(30) != 0
    refused.stop()
    assert "FLOWER_BASIC_AUTH" in refused.log_path.read_text()

    port = free_port()
    public = Process([sys.executable, "-m", "inferq.cli", "flower", "--port", str(port)],
                     {**public_env, "FLOWER_BASIC_AUTH": "ops:flower-pw"}, tmp_path / "flower-public.log")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{base}/healthcheck", timeout=2).is_success, 30, "Flower", public.proc)
        assert httpx.get(f"{base}/", timeout=5).status_code == 401
        assert httpx.get(f"{base}/", auth=("ops", "wrong"), timeout=5).status_code == 401
        assert httpx.get(f"{base}/workers", auth=("ops", "flower-pw"), timeout=5).status_code == 200
        assert "flower-pw" not in " ".join(psutil.Process(public.proc.pid).cmdline())
    finally:
        public.stop()
