"""The settings reference (config/.env.example, docs/configuration.md's tables) matches Settings."""

from __future__ import annotations

import pytest

from config import Settings, reference

README = reference.ROOT / "README.md"


def test_every_setting_has_a_description_and_a_section():
    fields = reference.described_fields()  # raises, naming them, if any lacks either
    assert sorted(name for _, name, _ in fields) == sorted(Settings.model_fields)


@pytest.mark.parametrize("path", [reference.ENV_EXAMPLE, reference.CONFIGURATION_DOC], ids=lambda p: p.name)
def test_generated_file_is_current(path):
    expected = reference.expected_files()[path]
    assert path.read_text() == expected, f"{path.name} is stale: run `make settings-docs`"


def test_check_fails_on_drift_and_writes_nothing(monkeypatch, capsys):
    before = {path: path.read_text() for path in reference.expected_files()}
    assert reference.main(["--check"]) == 0
    monkeypatch.setattr(Settings.model_fields["api_port"], "description", "A new description.")
    assert reference.main(["--check"]) == 1
    assert "stale: config/.env.example" in capsys.readouterr().err
    assert {path: path.read_text() for path in before} == before


def test_a_field_without_a_description_is_an_error(monkeypatch, capsys):
    monkeypatch.setattr(Settings.model_fields["api_port"], "description", None)
    assert reference.main(["--check"]) == 2
    assert "without a description: api_port" in capsys.readouterr().err


def test_defaults_are_read_from_the_model():
    table = reference.settings_table()
    assert "| `REDIS_URL` | `redis://127.0.0.1:6379/0` |" in table
    assert "| `API_KEYS` | (empty) |" in table
    assert "| `WORKER_TASK_EVENTS` | `false` |" in table
    assert "| `COORDINATOR_INTERVAL` | `10` |" in table
    assert "| `GPU_MONITOR_INTERVAL` | `5` |" in table


def test_readme_links_to_the_reference_instead_of_copying_it():
    text = README.read_text()
    assert "docs/configuration.md" in text
    assert "| `REDIS_URL`" not in text
