"""Engine configuration: one pydantic model, which the CLI and the LEANSERVE_* environment variables fill
(server/api/settings.py extends it with the HTTP server's options) and the engine takes as it is."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
KVCacheDtype = Literal["auto", "bf16", "fp8"]
Device = Literal["auto", "cpu", "cuda"]
LoadFormat = Literal["auto", "dummy"]
Quantization = Literal["auto", "none", "fp8"]  # models.quantization.QUANTIZATIONS
BLOCK_SIZES = (1, 8, 16, 32, 64, 128)


class EngineConfig(BaseModel):
    """Every engine option, with its default and its bounds; a bad value raises a ValueError naming it."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str | None = Field(
        None, description="HF model directory or cached hub name; unset: the embedded default model"
    )
    tokenizer: str | None = Field(None, description="tokenizer directory; unset: the model directory")
    served_model_name: str | None = Field(
        None, description="model name clients use; unset: the model directory name"
    )
    dtype: Dtype = Field("auto", description="weights dtype (and the KV cache's under kv_cache_dtype auto)")
    kv_cache_dtype: KVCacheDtype = Field(
        "auto", description="KV cache storage: auto (the model dtype), bf16, fp8 (e4m3 with per-row scales)"
    )
    device: Device = Field("auto", description="cuda when available under auto")
    load_format: LoadFormat = Field("auto", description="dummy: random weights from config.json")
    quantization: Quantization = Field(
        "auto",
        description="fp8: attention and MLP weights in float8 e4m3 with per-channel scales (a bf16/fp16 "
        "checkpoint is quantized at load); auto: as the checkpoint stores them; none: dense (an FP8 "
        "checkpoint is dequantized)",
    )
    block_size: int = Field(16, description=f"tokens per KV cache block, one of {BLOCK_SIZES}")
    max_num_seqs: int = Field(256, ge=1, description="most sequences in one batch")
    max_num_batched_tokens: int = Field(2048, ge=16, description="token budget of a step (chunked prefill)")
    max_model_len: int | None = Field(
        None, ge=1, description="context length; unset: the model's max_position_embeddings"
    )
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="GPU memory share to use")
    kv_cache_tokens: int = Field(65536, ge=1, description="KV cache size in tokens on CPU")
    enable_prefix_caching: bool = Field(True, description="reuse cached prompt blocks")
    enforce_eager: bool = Field(False, description="no CUDA graphs for decode")
    # On CUDA it hides the host work of a step behind the device; on CPU nothing overlaps and it would only
    # waste the last step.
    async_scheduling: bool | None = Field(
        None, description="launch step N+1 before step N's tokens reach the host; unset: on for CUDA"
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs sharing each layer's heads (worker processes); > 1 runs eager"
    )
    seed: int = Field(0, description="engine seed (dummy weights, unseeded sampling)")

    @field_validator("block_size")
    @classmethod
    def _block_size(cls, value: int) -> int:
        if value not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}")
        return value

    @field_validator("kv_cache_tokens")
    @classmethod
    def _kv_cache_tokens(cls, value: int, info) -> int:
        if value < info.data.get("block_size", 1):
            raise ValueError("kv_cache_tokens must hold at least one block")
        return value
