"""Typed view of a Hugging Face `config.json` for the Llama family (Llama 2/3, Mistral, Qwen2, Qwen3).

Accepts both the transformers 5 layout (`rope_parameters`) and the classic one (`rope_theta` +
`rope_scaling`); anything we cannot run exactly fails here with a message naming what is unsupported."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leanserve.models.quantization import checkpoint_quantization, fp8_block_size

# model_type -> architecture, for configs that omit "architectures".
SUPPORTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # None for plain RoPE; else holds "rope_type" and its parameters
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on the q/k/v projections (Qwen2)
    qk_norm: bool  # RMSNorm over each head of q and k before RoPE (Qwen3)
    bos_token_id: int | None
    eos_token_ids: list[int] = field(default_factory=list)
    quantization: str | None = None  # how the checkpoint stores its linear weights: "fp8" or None (dense)
    fp8_block: tuple[int, int] | None = None  # block-wise FP8 checkpoints: the (rows, columns) of a scale

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope_type '{rope_type}' (supported: {SUPPORTED_ROPE_TYPES})")

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` (and `generation_config.json` for extra EOS ids) from a model directory."""
        path = Path(path)
        raw = json.loads((path / "config.json").read_text())
        generation = path / "generation_config.json"
        extra_eos = json.loads(generation.read_text()).get("eos_token_id") if generation.exists() else None
        return cls.from_dict(raw, extra_eos)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], extra_eos: int | list[int] | None = None) -> ModelConfig:
        supported = SUPPORTED_ARCHITECTURES.values()
        architectures = raw.get("architectures") or [SUPPORTED_ARCHITECTURES.get(raw.get("model_type"))]
        architecture = next((a for a in architectures if a in supported), None)
        if architecture is None:
            raise ValueError(
                f"unsupported model architecture {raw.get('architectures') or raw.get('model_type')!r}: "
                f"leanserve runs {', '.join(supported)}"
            )
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act '{raw['hidden_act']}' (only silu)")
        if raw.get("mlp_bias"):
            raise ValueError("unsupported mlp_bias=true")
        num_heads = raw["num_attention_heads"]
        rope_theta, rope_scaling = _parse_rope(raw)
        max_positions = raw.get("max_position_embeddings", 4096)
        # Sliding-window attention is not implemented: cap the context at the window, where full
        # attention is the same computation.
        if raw.get("use_sliding_window", True) and raw.get("sliding_window"):
            max_positions = min(max_positions, raw["sliding_window"])
        eos: list[int] = []
        for ids in (raw.get("eos_token_id"), extra_eos):
            for token in ids if isinstance(ids, list) else [ids]:
                if token is not None and token not in eos:
                    eos.append(token)
        return cls(
            architecture=architecture,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_positions,
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            # Qwen2 always has q/k/v biases and its config does not say so.
            attention_bias=architecture == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
            qk_norm=architecture == "Qwen3ForCausalLM",
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos,
            quantization=checkpoint_quantization(raw),
            fp8_block=fp8_block_size(raw),
        )


def _parse_rope(raw: dict[str, Any]) -> tuple[float, dict | None]:
    """(theta, scaling or None) from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling`."""
    params = dict(raw.get("rope_parameters") or {})
    theta = params.pop("rope_theta", None) or raw.get("rope_theta", 10000.0)
    scaling = params or dict(raw.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:  # pre-4.45 spelling
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("rope_theta", None)
    if scaling.get("rope_type", "default") == "default":
        return float(theta), None
    return float(theta), scaling
