"""Our Llama-family decoder (Llama 2/3, Mistral, Qwen2 with qkv bias, Qwen3 with q/k norm) over the
paged KV cache. Projections are fused at load time (q/k/v into one matmul, gate/up into one); the
forward has no host syncs and no data-dependent shapes in decode, so the engine can graph-capture it.
With tensor parallelism each rank holds its share of the heads and MLP width (q/k/v and gate/up split by
output rows, o_proj and down_proj by input columns) and sums the two row-parallel outputs per layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leanserve.kernels.fp8 import FP8Rows
from leanserve.kernels.skinny_fused import skinny_linear_residual
from leanserve.kernels.stream_norm import StreamNorm
from leanserve.models.attention import AttentionBatch, paged_attention
from leanserve.models.config import ModelConfig
from leanserve.models.kv_cache import KVCache
from leanserve.models.layers import (
    GatedMLP,
    RMSNorm,
    RotaryEmbedding,
    empty_param,
    linear,
    linear_weight,
    reads_fp8_rows,
    stream_norm_fuses,
)
from leanserve.models.parallel import TensorParallel, check_divisible

# HF tensor name -> (our parameter, first row, end row, checkpoint slice or None). The slice is
# (dim, start, end) of the checkpoint tensor this rank reads (tensor parallelism); None reads it whole.
Layout = dict[str, tuple[str, int, int, tuple[int, int, int] | None]]


class Attention(nn.Module):
    """Self-attention over this rank's heads: Hq / tp query heads and Hkv / tp KV heads; with `fp8`, the
    q/k/v and output projections in FP8 with per-row scales."""

    def __init__(
        self,
        config: ModelConfig,
        layer_idx: int,
        dtype: torch.dtype,
        rope: RotaryEmbedding,
        tp_size: int = 1,
        fp8: bool = False,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads // tp_size
        self.num_kv_heads = config.num_kv_heads // tp_size
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.eps = config.rms_norm_eps
        self.rope = rope  # the model's one table, shared by every layer
        qkv_rows = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        linear_weight(self, "qkv_weight", qkv_rows, config.hidden_size, dtype, fp8)
        self.qkv_bias = empty_param(qkv_rows, dtype=dtype) if config.attention_bias else None
        linear_weight(self, "o_weight", config.hidden_size, self.num_heads * self.head_dim, dtype, fp8)
        # Qwen3: q_norm's weight repeated over the query heads and k_norm's over the KV heads, so one
        # normalisation and one multiply cover q and k.
        self.qk_norm_weight = (
            empty_param(self.num_heads + self.num_kv_heads, self.head_dim, dtype=dtype)
            if config.qk_norm
            else None
        )

    def forward(
        self, x: torch.Tensor | FP8Rows, positions: torch.Tensor, batch: AttentionBatch, kv_cache: KVCache
    ) -> torch.Tensor:
        """x: [T, H] (FP8Rows for W8A8 q/k/v); positions: [T] int64 -> the attention's output [T, Hq * D]
        before the output projection `o_weight`, which the layer applies (with the residual add in its
        epilogue, or not)."""
        num_tokens = x.shape[0]
        k_cache, v_cache = kv_cache.k[self.layer_idx], kv_cache.v[self.layer_idx]
        k_scale, v_scale = kv_cache.k_scale[self.layer_idx], kv_cache.v_scale[self.layer_idx]
        # Decode-sized steps on CUDA rotate q and k and write the cache in the product's epilogue; the
        # q/k norm (Qwen3) sits between the two and needs whole heads, so it keeps them apart, and so
        # does an fp8 cache, whose row scale needs a whole head (a program of the product holds part).
        fused = (
            self.qk_norm_weight is None
            and not kv_cache.quantized
            and self.rope.fuses_with(x, self.qkv_weight)
        )
        if fused:
            qkv = self.rope.project(
                x, self.qkv_weight, self.qkv_bias, positions, k_cache, v_cache, batch.slot_mapping,
                self.qkv_weight_scale,
            )  # fmt: skip
        else:
            qkv = linear(x, self.qkv_weight, self.qkv_bias, scale=self.qkv_weight_scale)
        if batch.prefetch is not None:
            batch.prefetch(self.o_weight)
        if fused:
            heads = (self.num_heads, self.num_kv_heads, self.num_kv_heads)
            q, k, v = qkv.view(num_tokens, -1, self.head_dim).split(heads, dim=1)
        else:
            if self.qk_norm_weight is not None:
                # The q and k heads, normalised in place: the rotation reads them from qkv.
                qk = qkv[:, : self.qk_norm_weight.numel()].view(num_tokens, *self.qk_norm_weight.shape)
                torch.mul(F.rms_norm(qk, (self.head_dim,), None, self.eps), self.qk_norm_weight, out=qk)
            q, k, v = self.rope(qkv, positions, k_cache, v_cache, batch.slot_mapping, k_scale, v_scale)
        out = paged_attention(q, k, v, k_cache, v_cache, batch, self.scale, k_scale, v_scale)
        return out.view(num_tokens, -1)


class DecoderLayer(nn.Module):
    """Attention and MLP blocks with pre-norms. The residual stream travels beside the hidden states
    (as in vLLM): each norm adds its block's input to the stream and normalises the sum in one kernel,
    so a layer returns its MLP output unadded and the next layer's input norm (or the final norm) adds it."""

    def __init__(
        self,
        config: ModelConfig,
        layer_idx: int,
        dtype: torch.dtype,
        rope: RotaryEmbedding,
        tp: TensorParallel | None,
        fp8: bool = False,
    ) -> None:
        super().__init__()
        tp_size = tp.world_size if tp else 1
        self.tp = tp
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.attn = Attention(config, layer_idx, dtype, rope, tp_size, fp8)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size // tp_size, dtype, fp8)
        self.post_attention_norm_folded = False  # see fold_post_attention_norm

    def fold_post_attention_norm(self) -> None:
        """Multiply the post-attention norm's weight into the gate/up weight's columns (rounded once to
        the dtype) and make the norm's own weight ones: the same MLP input up to that rounding, and the
        norm can then live in the products' epilogues (`stream_norm_fuses`). Single device only (the
        residual add needs the all-reduced output under tensor parallelism) and dense weights only (an FP8
        weight's scales are per row, the norm's per column)."""
        if self.tp is not None:
            raise ValueError("the post-attention norm stays a kernel under tensor parallelism")
        if self.mlp.gate_up_weight_scale is not None:
            raise ValueError("the post-attention norm stays a kernel with FP8 weights")
        weight = self.post_attention_norm.weight
        gate_up = self.mlp.gate_up_weight
        gate_up.copy_(gate_up.float() * weight.float()[None, :])
        weight.fill_(1.0)
        self.post_attention_norm_folded = True

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        batch: AttentionBatch,
        kv_cache: KVCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] the previous layer's MLP output (the embeddings, with residual None, for the first
        layer); residual: [T, H] the stream it has not been added to. Returns (MLP output, stream)."""
        # FP8 weights on CUDA: the norms write their rows quantized for the W8A8 products they feed.
        x, residual = self.input_norm(x, residual, fp8=reads_fp8_rows(x, self.attn.qkv_weight))
        attn = self.attn(x, positions, batch, kv_cache)
        if self.post_attention_norm_folded and stream_norm_fuses(
            attn, self.attn.o_weight, self.mlp.gate_up_weight
        ):
            return self._mlp_with_norm_in_epilogues(attn, residual)
        return self._mlp(attn, residual)

    def _mlp(self, attn: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """o projection, residual add + post-attention norm (one kernel), MLP. o_proj and down_proj are
        row-parallel: each rank's output is a partial sum over its heads (its MLP columns), so one
        all-reduce after each completes it before it joins the stream."""
        x = linear(attn, self.attn.o_weight, scale=self.attn.o_weight_scale)
        if self.tp is not None:
            x = self.tp.all_reduce(x)
        x, residual = self.post_attention_norm(x, residual, fp8=reads_fp8_rows(x, self.mlp.gate_up_weight))
        x = self.mlp(x)
        if self.tp is not None:
            x = self.tp.all_reduce(x)
        return x, residual

    def _mlp_with_norm_in_epilogues(
        self, attn: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same with the post-attention norm carried by the products (small decode batches, single
        device): o adds its output to the stream and writes its sums of squares, gate/up scales its rows
        by 1/rms (the norm's weight folded into gate/up at load)."""
        residual, squares = skinny_linear_residual(
            attn, self.attn.o_weight, residual, self.attn.o_weight_scale
        )
        return self.mlp(residual, StreamNorm(squares, self.post_attention_norm.eps)), residual


class CausalLM(nn.Module):
    """Parameters are created empty on the current default device; `models.loader` fills them.

    `tp` (tensor parallelism): this rank's place; the model then holds its share of every attention
    and MLP matrix, and every rank runs forward on the same inputs. Embeddings, norms and the LM head
    stay whole on every rank (see docs/benchmarks.md, Tensor parallelism). None or one rank: the
    plain single-device model, with no collective anywhere.

    `fp8`: the attention and MLP matrices in float8 e4m3 with per-row fp32 scales (`{weight}_scale`);
    embeddings, norms and the LM head stay in `dtype`."""

    def __init__(
        self, config: ModelConfig, dtype: torch.dtype, tp: TensorParallel | None = None, fp8: bool = False
    ) -> None:
        super().__init__()
        tp = tp if tp is not None and tp.world_size > 1 else None
        if tp is not None:
            check_divisible(config, tp.world_size)
        self.config = config
        self.tp = tp
        self.fp8 = fp8
        self.embed_weight = empty_param(config.vocab_size, config.hidden_size, dtype=dtype)
        self.rope = RotaryEmbedding(config, dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, dtype, self.rope, tp, fp8) for i in range(config.num_layers)
        )
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

    @property
    def tp_size(self) -> int:
        return self.tp.world_size if self.tp else 1

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        batch: AttentionBatch,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        """input_ids, positions: [T] int64 -> final-normed hidden states [T, hidden]"""
        x, residual = F.embedding(input_ids, self.embed_weight), None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, batch, kv_cache)
        if batch.prefetch is not None:
            batch.prefetch.join()
        return self.norm(x, residual)[0]  # the last layer's MLP output joins the stream here

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> logits [N, vocab] float32"""
        return linear(hidden, self.lm_head_weight, out_dtype=torch.float32)

    def checkpoint_layout(self) -> Layout:
        """HF checkpoint tensor name -> (our parameter name, first row, end row, checkpoint slice) it
        fills. A tensor smaller than its rows (q_norm/k_norm weights) is broadcast over them. Under
        tensor parallelism the slice names the rows (q/k/v, gate/up) or columns (o_proj, down_proj) of
        the checkpoint tensor that belong to this rank."""
        cfg, tp = self.config, self.tp
        tp_size = self.tp_size
        heads, kv_heads = cfg.num_heads // tp_size, cfg.num_kv_heads // tp_size
        q_rows, kv_rows = heads * cfg.head_dim, kv_heads * cfg.head_dim
        inter = cfg.intermediate_size // tp_size

        def part(size: int, dim: int = 0) -> tuple[int, int, int] | None:
            """This rank's share of a checkpoint dimension of `size` (whole without parallelism)."""
            return (dim, *tp.shard(size)) if tp else None

        layout: Layout = {"model.embed_tokens.weight": ("embed_weight", 0, cfg.vocab_size, None)}
        if not cfg.tie_word_embeddings:
            layout["lm_head.weight"] = ("lm_head_weight", 0, cfg.vocab_size, None)
        layout["model.norm.weight"] = ("norm.weight", 0, cfg.hidden_size, None)
        for i in range(cfg.num_layers):
            hf, ours = f"model.layers.{i}.", f"layers.{i}."
            qkv = {
                "q_proj": (0, q_rows, part(cfg.num_heads * cfg.head_dim)),
                "k_proj": (q_rows, q_rows + kv_rows, part(cfg.num_kv_heads * cfg.head_dim)),
                "v_proj": (q_rows + kv_rows, q_rows + 2 * kv_rows, part(cfg.num_kv_heads * cfg.head_dim)),
            }
            for proj, (lo, hi, shard) in qkv.items():
                layout[f"{hf}self_attn.{proj}.weight"] = (f"{ours}attn.qkv_weight", lo, hi, shard)
                if cfg.attention_bias:
                    layout[f"{hf}self_attn.{proj}.bias"] = (f"{ours}attn.qkv_bias", lo, hi, shard)
            if cfg.qk_norm:
                norm = f"{ours}attn.qk_norm_weight"
                layout[f"{hf}self_attn.q_norm.weight"] = (norm, 0, heads, None)
                layout[f"{hf}self_attn.k_norm.weight"] = (norm, heads, heads + kv_heads, None)
            o_shard = part(cfg.num_heads * cfg.head_dim, dim=1)
            layout[f"{hf}self_attn.o_proj.weight"] = (f"{ours}attn.o_weight", 0, cfg.hidden_size, o_shard)
            full_inter = cfg.intermediate_size
            layout[f"{hf}mlp.gate_proj.weight"] = (f"{ours}mlp.gate_up_weight", 0, inter, part(full_inter))
            layout[f"{hf}mlp.up_proj.weight"] = (
                f"{ours}mlp.gate_up_weight",
                inter,
                2 * inter,
                part(full_inter),
            )
            down_shard = part(full_inter, dim=1)
            layout[f"{hf}mlp.down_proj.weight"] = (f"{ours}mlp.down_weight", 0, cfg.hidden_size, down_shard)
            layout[f"{hf}input_layernorm.weight"] = (f"{ours}input_norm.weight", 0, cfg.hidden_size, None)
            layout[f"{hf}post_attention_layernorm.weight"] = (
                f"{ours}post_attention_norm.weight",
                0,
                cfg.hidden_size,
                None,
            )
        return layout
