"""Our Llama-family decoder (Llama 2/3, Mistral, Qwen2 with qkv bias, Qwen3 with q/k norm) over the
paged KV cache. Projections are fused at load time (q/k/v into one matmul, gate/up into one); the
forward has no host syncs and no data-dependent shapes in decode, so the engine can graph-capture it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import AttentionBatch, paged_attention
from models.config import ModelConfig
from models.kv_cache import KVCache
from models.layers import GatedMLP, RMSNorm, RotaryEmbedding, apply_rope, empty_param, rms_norm


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.eps = config.rms_norm_eps
        qkv_rows = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv_weight = empty_param(qkv_rows, config.hidden_size, dtype=dtype)
        self.qkv_bias = empty_param(qkv_rows, dtype=dtype) if config.attention_bias else None
        self.o_weight = empty_param(config.hidden_size, self.num_heads * self.head_dim, dtype=dtype)
        # Qwen3: q_norm's weight repeated over the query heads and k_norm's over the KV heads, so one
        # normalisation and one multiply cover q and k.
        self.qk_norm_weight = (
            empty_param(self.num_heads + self.num_kv_heads, self.head_dim, dtype=dtype)
            if config.qk_norm
            else None
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: AttentionBatch,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        """x: [T, H]; cos, sin: [T, 1, D] -> [T, H]"""
        num_tokens = x.shape[0]
        qk_size = (self.num_heads + self.num_kv_heads) * self.head_dim
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias)
        qk = qkv[:, :qk_size].view(num_tokens, -1, self.head_dim)
        v = qkv[:, qk_size:].view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm_weight is not None:
            qk = rms_norm(qk, None, self.eps) * self.qk_norm_weight
        qk = apply_rope(qk, cos, sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        o = paged_attention(
            q, k, v, kv_cache.k[self.layer_idx], kv_cache.v[self.layer_idx], batch, self.scale
        )
        return F.linear(o.view(num_tokens, -1), self.o_weight)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.attn = Attention(config, layer_idx, dtype)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, dtype)

    def forward(self, x, cos, sin, batch: AttentionBatch, kv_cache: KVCache) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), cos, sin, batch, kv_cache)
        return x + self.mlp(self.post_attention_norm(x))


class CausalLM(nn.Module):
    """Parameters are created empty on the current default device; `models.loader` fills them."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.embed_weight = empty_param(config.vocab_size, config.hidden_size, dtype=dtype)
        self.rope = RotaryEmbedding(config, dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, i, dtype) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head_weight = (
            self.embed_weight
            if config.tie_word_embeddings
            else empty_param(config.vocab_size, config.hidden_size, dtype=dtype)
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_weight.device

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        batch: AttentionBatch,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        """input_ids, positions: [T] int64 -> final-normed hidden states [T, hidden]"""
        x = F.embedding(input_ids, self.embed_weight)
        cos, sin = self.rope(positions)
        for layer in self.layers:
            x = layer(x, cos, sin, batch, kv_cache)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> logits [N, vocab] float32"""
        return F.linear(hidden, self.lm_head_weight).float()

    def checkpoint_layout(self) -> dict[str, tuple[str, int, int]]:
        """HF checkpoint tensor name -> (our parameter name, first row, end row) it fills. A tensor
        smaller than its rows (q_norm/k_norm weights) is broadcast over them."""
        cfg = self.config
        q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        layout = {"model.embed_tokens.weight": ("embed_weight", 0, cfg.vocab_size)}
        if not cfg.tie_word_embeddings:
            layout["lm_head.weight"] = ("lm_head_weight", 0, cfg.vocab_size)
        layout["model.norm.weight"] = ("norm.weight", 0, cfg.hidden_size)
        for i in range(cfg.num_layers):
            hf, ours = f"model.layers.{i}.", f"layers.{i}."
            qkv = {
                "q_proj": (0, q_rows),
                "k_proj": (q_rows, q_rows + kv_rows),
                "v_proj": (q_rows + kv_rows, q_rows + 2 * kv_rows),
            }
            for proj, (lo, hi) in qkv.items():
                layout[f"{hf}self_attn.{proj}.weight"] = (f"{ours}attn.qkv_weight", lo, hi)
                if cfg.attention_bias:
                    layout[f"{hf}self_attn.{proj}.bias"] = (f"{ours}attn.qkv_bias", lo, hi)
            if cfg.qk_norm:
                layout[f"{hf}self_attn.q_norm.weight"] = (f"{ours}attn.qk_norm_weight", 0, cfg.num_heads)
                heads = cfg.num_heads + cfg.num_kv_heads
                layout[f"{hf}self_attn.k_norm.weight"] = (f"{ours}attn.qk_norm_weight", cfg.num_heads, heads)
            layout[f"{hf}self_attn.o_proj.weight"] = (f"{ours}attn.o_weight", 0, cfg.hidden_size)
            inter = cfg.intermediate_size
            layout[f"{hf}mlp.gate_proj.weight"] = (f"{ours}mlp.gate_up_weight", 0, inter)
            layout[f"{hf}mlp.up_proj.weight"] = (f"{ours}mlp.gate_up_weight", inter, 2 * inter)
            layout[f"{hf}mlp.down_proj.weight"] = (f"{ours}mlp.down_weight", 0, cfg.hidden_size)
            layout[f"{hf}input_layernorm.weight"] = (f"{ours}input_norm.weight", 0, cfg.hidden_size)
            layout[f"{hf}post_attention_layernorm.weight"] = (
                f"{ours}post_attention_norm.weight",
                0,
                cfg.hidden_size,
            )
        return layout
