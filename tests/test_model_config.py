"""ModelConfig: both config.json layouts (transformers 5 `rope_parameters`, classic `rope_theta` +
`rope_scaling`), family specifics (Qwen2 bias, Qwen3 q/k norm, derived head_dim), EOS ids and the
errors for what we cannot run; plus the Llama-3 rope scaling against HF's own rope init."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from leanserve.models.config import ModelConfig
from leanserve.models.layers import rope_inv_freq

LLAMA3_8B = Path(__file__).resolve().parents[1] / "benchmarks" / "models" / "llama-3-8b"
LLAMA3_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}


def _llama(**overrides) -> dict:
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 1000,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    raw.update(overrides)
    return raw


@pytest.mark.skipif(not LLAMA3_8B.exists(), reason="benchmark config not present")
def test_llama3_8b_classic_layout():
    cfg = ModelConfig.from_dir(LLAMA3_8B)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (32, 32, 8, 128)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == LLAMA3_SCALING
    assert not cfg.tie_word_embeddings and not cfg.attention_bias and not cfg.qk_norm
    assert cfg.eos_token_ids == [128001] and cfg.bos_token_id == 128000


def test_smollm2_transformers5_layout(default_model_path):
    cfg = ModelConfig.from_dir(default_model_path)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert cfg.rope_theta == 100000.0 and cfg.rope_scaling is None
    assert cfg.tie_word_embeddings and cfg.max_position_embeddings == 8192
    assert cfg.eos_token_ids[0] == 2


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_theta": 500000.0, "rope_scaling": LLAMA3_SCALING},
        {"rope_parameters": {"rope_theta": 500000.0, **LLAMA3_SCALING}},
    ],
    ids=["classic", "rope_parameters"],
)
def test_both_rope_layouts_parse_the_same(rope):
    cfg = ModelConfig.from_dict(_llama(**rope))
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == LLAMA3_SCALING


def test_old_rope_scaling_type_key():
    cfg = ModelConfig.from_dict(_llama(rope_scaling={"type": "linear", "factor": 2.0}))
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize(
    ("kind", "bias", "qk_norm", "head_dim"), [("qwen2", True, False, 64), ("qwen3", False, True, 64)]
)
def test_qwen_specifics(tiny_model_factory, kind, bias, qk_norm, head_dim):
    cfg = ModelConfig.from_dir(tiny_model_factory(kind))
    assert (cfg.attention_bias, cfg.qk_norm, cfg.head_dim) == (bias, qk_norm, head_dim)


def test_architecture_from_model_type_when_architectures_missing():
    raw = _llama(architectures=None, model_type="qwen3")
    assert ModelConfig.from_dict(raw).architecture == "Qwen3ForCausalLM"


def test_head_dim_derived_and_kv_heads_default():
    raw = _llama()
    del raw["num_key_value_heads"]
    cfg = ModelConfig.from_dict(raw)
    assert cfg.head_dim == 64 and cfg.num_kv_heads == 4


def test_eos_ids_merged_with_generation_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_llama(eos_token_id=[2, 5])))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 9]}))
    assert ModelConfig.from_dir(tmp_path).eos_token_ids == [2, 5, 9]


def test_mistral_sliding_window_caps_context():
    raw = _llama(architectures=["MistralForCausalLM"], max_position_embeddings=32768, sliding_window=4096)
    assert ModelConfig.from_dict(raw).max_position_embeddings == 4096
    raw["sliding_window"] = None
    assert ModelConfig.from_dict(raw).max_position_embeddings == 32768


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "unsupported model architecture.*GPT2LMHeadModel"),
        ({"architectures": None, "model_type": "mamba"}, "unsupported model architecture.*mamba"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope_type 'yarn'"),
        ({"hidden_act": "gelu"}, "unsupported hidden_act"),
        ({"num_key_value_heads": 3}, "not a multiple"),
    ],
)
def test_unsupported_configs_fail_clearly(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(_llama(**overrides))


@pytest.mark.parametrize(
    "scaling",
    [None, LLAMA3_SCALING, {"rope_type": "linear", "factor": 4.0}],
    ids=["default", "llama3", "linear"],
)
def test_rope_inv_freq_matches_hf(scaling):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    raw = _llama(head_dim=128, rope_theta=500000.0, rope_scaling=scaling)
    expected = LlamaRotaryEmbedding(
        LlamaConfig(**{k: v for k, v in raw.items() if k != "architectures"})
    ).inv_freq
    torch.testing.assert_close(rope_inv_freq(ModelConfig.from_dict(raw)), expected, rtol=1e-6, atol=0)
