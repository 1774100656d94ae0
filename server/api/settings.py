"""Every `leanserve` option in one pydantic-settings model: read from the command line, else from the
environment variable `LEANSERVE_<OPTION>`, else the default. `engine_config()` hands the engine part
over as the typed `EngineConfig` dataclass; the rest configures the HTTP server."""

from __future__ import annotations

from dataclasses import fields
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from leanserve.server.engine.config import Device, Dtype, EngineConfig, LoadFormat

_E = EngineConfig  # engine defaults live in one place: the dataclass


class Settings(BaseSettings):
    """Engine options (see server/config.py) followed by HTTP server options."""

    model_config = SettingsConfigDict(
        env_prefix="LEANSERVE_",
        cli_prog_name="leanserve",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_hide_none_type=True,
        cli_avoid_json=True,
        extra="forbid",
    )

    # Engine.
    model: str | None = Field(
        None, description="HF model directory or cached hub name; unset: the embedded default model"
    )
    tokenizer: str | None = Field(None, description="tokenizer directory; unset: the model directory")
    served_model_name: str | None = Field(
        None, description="model name clients use; unset: the model directory name"
    )
    dtype: Dtype = Field(_E.dtype, description="weights and KV cache dtype")
    device: Device = Field(_E.device, description="cuda when available under auto")
    load_format: LoadFormat = Field(_E.load_format, description="dummy: random weights from config.json")
    block_size: int = Field(_E.block_size, description="tokens per KV cache block")
    max_num_seqs: int = Field(_E.max_num_seqs, description="most sequences in one batch")
    max_num_batched_tokens: int = Field(_E.max_num_batched_tokens, description="token budget of a step")
    max_model_len: int | None = Field(
        None, description="context length; unset: the model's max_position_embeddings"
    )
    gpu_memory_utilization: float = Field(_E.gpu_memory_utilization, description="GPU memory share to use")
    kv_cache_tokens: int = Field(_E.kv_cache_tokens, description="KV cache size in tokens on CPU")
    enable_prefix_caching: bool = Field(_E.enable_prefix_caching, description="reuse cached prompt blocks")
    enforce_eager: bool = Field(_E.enforce_eager, description="no CUDA graphs for decode")
    async_scheduling: bool | None = Field(
        None, description="launch step N+1 before step N's tokens reach the host; unset: on for CUDA"
    )
    tensor_parallel_size: int = Field(
        _E.tensor_parallel_size, ge=1, description="GPUs sharing each layer's heads (worker processes)"
    )
    seed: int = Field(_E.seed, description="engine seed (dummy weights, unseeded sampling)")
    # HTTP server.
    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    api_key: str | None = Field(
        None, description="Bearer key required on /v1 routes, /tokenize and /detokenize; unset: no key"
    )
    max_queued_requests: int = Field(
        1024, ge=1, description="accepted requests not yet generating; beyond it 429"
    )
    max_request_body_bytes: int = Field(1 << 20, ge=1024, description="larger request bodies get 413")
    sse_heartbeat_seconds: float = Field(15.0, gt=0, description="SSE comment after this much silence")
    shutdown_grace_seconds: float = Field(
        30.0, ge=0, description="SIGTERM: time to finish in-flight requests"
    )
    max_choices_per_request: int = Field(
        64, ge=1, description="most choices (prompts x n) of one request; beyond it 400"
    )
    # Connection limits (uvicorn's h11 protocol; see server/api/cli.py and docs/deployment.md).
    max_header_bytes: int = Field(
        32 * 1024, ge=1024, description="request line + headers larger than this: 400 and closed"
    )
    header_timeout_seconds: float = Field(
        10.0, gt=0, description="a client that has not sent a whole request head by then is disconnected"
    )
    keep_alive_timeout_seconds: float = Field(5.0, gt=0, description="idle keep-alive connections close")
    max_connections: int = Field(
        2048, ge=1, description="open connections; beyond it 503 (beyond twice it: closed at once)"
    )
    log_format: Literal["text", "json"] = Field("text", description="log line format")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    def engine_config(self) -> EngineConfig:
        return EngineConfig(**{f.name: getattr(self, f.name) for f in fields(EngineConfig)})


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Settings from `argv` (default: sys.argv[1:]) over LEANSERVE_* env vars over defaults."""
    return Settings(_cli_parse_args=argv if argv is not None else True)
