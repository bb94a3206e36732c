"""Settings: every field documented in config/.env.example, which parses to the defaults."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from config import Settings
from inferq.cli import main

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / ".env.example"


def _example_values() -> dict[str, str]:
    pairs = {}
    for line in EXAMPLE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            pairs[name.strip()] = value.strip()
    return pairs


def test_every_setting_is_documented_in_env_example():
    documented = set(_example_values())
    fields = {name.upper() for name in Settings.model_fields}
    assert fields == documented


def test_env_example_values_are_the_defaults(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    defaults = Settings(_env_file=None)
    from_example = Settings(_env_file=str(EXAMPLE))
    assert from_example == defaults


def test_environment_overrides_and_key_helpers(monkeypatch):
    monkeypatch.setenv("MAX_NUM_SEQS", "64")
    monkeypatch.setenv("API_KEYS", "dev-key-1, iq-a-long-enough-random-key-123")
    s = Settings(_env_file=None)
    assert s.max_num_seqs == 64
    assert s.bootstrap_keys == ["dev-key-1", "iq-a-long-enough-random-key-123"]
    assert s.placeholder_keys == ["dev-key-1"]


def test_cli_help_lists_every_subcommand():
    runner = CliRunner()
    out = runner.invoke(main, ["--help"]).output
    for command in ("run", "api", "worker", "flower", "prepare-model", "download-model", "db", "keys"):
        assert command in out
        sub = runner.invoke(main, [command, "--help"])
        assert sub.exit_code == 0, sub.output
        assert "Usage:" in sub.output


def test_run_creates_a_dev_key_once(tmp_path, monkeypatch):
    from config import get_settings
    from inferq.stack import ensure_dev_key

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("API_KEYS", raising=False)
    get_settings.cache_clear()
    try:
        key = ensure_dev_key(tmp_path / ".env")
        assert key.startswith("iq-dev-") and len(key) > 30
        assert f"API_KEYS={key}" in (tmp_path / ".env").read_text()
        monkeypatch.delenv("API_KEYS")  # the second run reads it back from .env
        get_settings.cache_clear()
        assert ensure_dev_key(tmp_path / ".env") == key  # same key, no new line
        assert (tmp_path / ".env").read_text().count("API_KEYS=") == 1
    finally:
        monkeypatch.delenv("API_KEYS", raising=False)
        get_settings.cache_clear()
