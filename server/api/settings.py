"""Every `leanserve` option in one pydantic-settings model: read from the command line, else from the
environment variable `LEANSERVE_<OPTION>`, else the default. The engine's options are `EngineConfig`'s
own fields (declared once, there); `engine_config()` hands them over, the rest configures the HTTP server."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from leanserve.server.engine.config import EngineConfig


class Settings(BaseSettings, EngineConfig):
    """Engine options (EngineConfig's fields) followed by HTTP server options."""

    model_config = SettingsConfigDict(
        env_prefix="LEANSERVE_",
        cli_prog_name="leanserve",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_hide_none_type=True,
        cli_avoid_json=True,
        extra="forbid",
    )

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
    tool_call_parser: Literal["auto", "hermes", "llama3_json", "mistral"] = Field(
        "auto", description="format of the model's tool calls; auto: the one its chat template writes"
    )
    log_format: Literal["text", "json"] = Field("text", description="log line format")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    def engine_config(self) -> EngineConfig:
        return EngineConfig(**self.model_dump(include=set(EngineConfig.model_fields)))


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Settings from `argv` (default: sys.argv[1:]) over LEANSERVE_* env vars over defaults."""
    return Settings(_cli_parse_args=argv if argv is not None else True)
