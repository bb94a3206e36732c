"""Model preparation writes only the packaged model, only where it belongs.

`prepare-model` and `inferq run`'s prepare step never touch a directory inferq
did not prepare, and never create one for a hub id. The full dequantization
takes about 20 s, so these tests stop at the decision (no torch import).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from config import get_settings
from inferq import stack
from workers import model_prep
from workers.cli import prepare_model
from workers.model_prep import DEFAULT_MODEL_DIR, MARKER, ModelPrepError


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty working directory (no .env), settings read afresh."""
    monkeypatch.chdir(tmp_path)
    for name in ("MODEL_NAME", "ENGINE"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


@pytest.fixture
def no_preparation(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Records the targets ``inferq run`` would prepare instead of preparing them."""
    targets: list[Path] = []
    monkeypatch.setattr(stack, "prepare_from_gguf", lambda gguf, target, force=False: targets.append(target))
    return targets


def user_model(path: Path) -> dict[str, bytes]:
    """A user's own model directory; returns its files' contents."""
    path.mkdir(parents=True)
    files = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"weights"}
    for name, data in files.items():
        (path / name).write_bytes(data)
    return files


def prepared_model(path: Path) -> None:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / MARKER).write_text("prepared from test\n")


def assert_untouched(path: Path, files: dict[str, bytes]) -> None:
    assert sorted(p.name for p in path.iterdir()) == sorted(files)
    for name, data in files.items():
        assert (path / name).read_bytes() == data


def test_prepare_model_refuses_a_user_directory(workdir: Path) -> None:
    mine = workdir / "my-model"
    files = user_model(mine)
    result = CliRunner().invoke(prepare_model, ["--target", str(mine)])
    assert result.exit_code != 0
    assert "did not prepare" in result.output and "--force" in result.output
    assert_untouched(mine, files)


def test_prepare_model_ignores_model_name(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = workdir / "models" / "mine"
    files = user_model(mine)
    prepared_model(workdir / DEFAULT_MODEL_DIR)  # so the default target is a no-op here
    monkeypatch.setenv("MODEL_NAME", str(mine))
    get_settings.cache_clear()
    result = CliRunner().invoke(prepare_model, [])
    assert result.exit_code == 0, result.output
    assert f"model ready: {DEFAULT_MODEL_DIR}" in result.output
    assert_untouched(mine, files)


def test_prepare_model_twice_is_a_no_op(workdir: Path) -> None:
    target = workdir / "prepared"
    prepared_model(target)
    before = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    result = CliRunner().invoke(prepare_model, ["--target", str(target)])
    assert result.exit_code == 0, result.output
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == before


def test_check_target(tmp_path: Path) -> None:
    model_prep.check_target(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    model_prep.check_target(tmp_path / "empty")
    half = tmp_path / "half-written"  # ours (marker) but unfinished: may be replaced
    half.mkdir()
    (half / MARKER).write_text("")
    (half / "model.safetensors").write_bytes(b"")
    model_prep.check_target(half)
    user_model(tmp_path / "mine")
    with pytest.raises(ModelPrepError, match="refusing"):
        model_prep.check_target(tmp_path / "mine")
    model_prep.check_target(tmp_path / "mine", force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelPrepError, match="not a directory"):
        model_prep.check_target(tmp_path / "file", force=True)


def test_only_the_default_directory_is_the_default_model(workdir: Path) -> None:
    for name in ("models/SmolLM2-135M-Instruct", "./models/SmolLM2-135M-Instruct",
                 str(workdir / "models" / "SmolLM2-135M-Instruct")):
        assert model_prep.is_default_model(name), name
        assert model_prep.needs_default_model(name), name
    for name in ("models/mine", "Qwen/Qwen2.5-0.5B-Instruct", "/srv/models/SmolLM2-135M-Instruct"):
        assert not model_prep.is_default_model(name), name
        assert not model_prep.needs_default_model(name), name
    prepared_model(workdir / DEFAULT_MODEL_DIR)
    assert not model_prep.needs_default_model(str(DEFAULT_MODEL_DIR))


def test_run_leaves_a_user_directory_alone(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                           no_preparation: list[Path]) -> None:
    mine = workdir / "models" / "mine"
    files = user_model(mine)
    monkeypatch.setenv("MODEL_NAME", "models/mine")
    get_settings.cache_clear()
    stack.ensure_model()
    assert no_preparation == []
    assert_untouched(mine, files)


def test_run_creates_nothing_for_a_hub_id(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                          no_preparation: list[Path]) -> None:
    monkeypatch.setenv("MODEL_NAME", "Qwen/Qwen2.5-0.5B-Instruct")
    get_settings.cache_clear()
    stack.ensure_model()
    assert no_preparation == []
    assert list(workdir.iterdir()) == []


def test_run_prepares_the_default_model_once(workdir: Path, no_preparation: list[Path]) -> None:
    stack.ensure_model()  # MODEL_NAME unset: the default
    assert no_preparation == [DEFAULT_MODEL_DIR]
    prepared_model(workdir / DEFAULT_MODEL_DIR)
    stack.ensure_model()
    assert no_preparation == [DEFAULT_MODEL_DIR]


def test_run_prepares_nothing_for_the_scripted_engine(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                      no_preparation: list[Path]) -> None:
    monkeypatch.setenv("ENGINE", "scripted")
    get_settings.cache_clear()
    stack.ensure_model()
    assert no_preparation == []
