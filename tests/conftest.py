"""Shared test setup: Triton runs interpreted on machines without a GPU, and tiny random-weight models
(real SmolLM2 tokenizer, Llama-family configs) are written to temp dirs so most tests never load real
weights."""

from __future__ import annotations

import os
import shutil

# Must happen before any Triton kernel module is imported (the interpreter is chosen at decoration
# time). Decide without importing torch.cuda machinery that would initialise a context.
if "TRITON_INTERPRET" not in os.environ and not shutil.which("nvidia-smi"):
    os.environ["TRITON_INTERPRET"] = "1"

import json
from pathlib import Path

import pytest
import torch
from http_server import openai_client, serve

from leanserve.models.weights_source import default_model_dir
from leanserve.server.engine.runtime import setup_process

HAS_CUDA = torch.cuda.is_available()
# As the CLI sets up a serving process: cuBLASLt for torch's products, NVLink multicast off for NCCL.
setup_process("cuda" if HAS_CUDA else "cpu")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # xdist workers share the cores: one intra-op thread each, or OpenMP spin-waits oversubscribe them.
    torch.set_num_threads(1)

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)

# Small but structurally complete configs: GQA with a non-power-of-two group, head dim 64 so the GPU
# kernel path is valid too.
TINY_CONFIGS: dict[str, dict] = {
    "llama": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 192,
        "intermediate_size": 384,
        "num_hidden_layers": 2,
        "num_attention_heads": 3,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
    },
    "llama3": {  # untied embeddings and Llama-3 rope scaling
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
            "rope_type": "llama3",
        },
        "tie_word_embeddings": False,
    },
    "qwen2": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
    },
    "qwen3": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
    },
}


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The real converted SmolLM2 directory (converted once per cache)."""
    return default_model_dir()


def write_tiny_model(out: Path, kind: str, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Write config + random safetensors weights (HF's own initialisation, scaled up so that greedy
    decoding is not degenerate) + the SmolLM2 tokenizer to `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer_config = json.loads((tokenizer_dir / "config.json").read_text())
    cfg = dict(TINY_CONFIGS[kind])
    cfg.update(
        vocab_size=tokenizer_config["vocab_size"],
        max_position_embeddings=2048,
        bos_token_id=tokenizer_config["bos_token_id"],
        eos_token_id=tokenizer_config["eos_token_id"],
        torch_dtype="float32",
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(out)
    config.initializer_range = 0.2
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if kind == "qwen2":  # make the qkv bias matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    model.save_pretrained(out)
    for name in _TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, default_model_path):
    """`tiny_model_factory(kind)` -> directory of a tiny random model of that family (cached)."""
    made: dict[str, Path] = {}

    def make(kind: str = "llama") -> Path:
        if kind not in made:
            made[kind] = write_tiny_model(tmp_path_factory.mktemp(f"tiny-{kind}"), kind, default_model_path)
        return made[kind]

    return make


@pytest.fixture(scope="session")
def tiny_model_path(tiny_model_factory) -> Path:
    """A tiny random Llama (3 query / 1 KV heads, head dim 64) with the real SmolLM2 tokenizer."""
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def base_url(engine):
    """A real uvicorn server over the module's `engine` fixture (each server test module defines its own
    engine, with the model and limits it needs)."""
    with serve(engine) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    """The official OpenAI client against `base_url`."""
    return openai_client(base_url)
