"""`leanserve` / `python -m leanserve.server`: settings from the command line and LEANSERVE_* env vars;
uvicorn listens at once while the engine loads in the background (/health answers 503 until it is ready);
SIGTERM stops admitting, lets in-flight requests finish within the grace period (aborts the rest) and
exits 0. A model that fails to load exits 1."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import threading

import uvicorn

from leanserve.server.api.app import ServerState, create_app
from leanserve.server.api.settings import Settings, parse_settings

logger = logging.getLogger("leanserve")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line; request lines carry their fields as keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name}
        entry |= getattr(record, "fields", None) or {"message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler()
    if settings.log_format == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)


def _load_engine(state: ServerState, server: uvicorn.Server) -> None:
    # Heavy (torch, the model code): off the startup path.
    from leanserve.server.engine.async_engine import AsyncEngine
    from leanserve.server.engine.engine_setup import resolve_device
    from leanserve.server.engine.runtime import settle_process, setup_process

    config = state.settings.engine_config()
    try:
        setup_process(resolve_device(config.device).type, config.seed)
        engine = AsyncEngine.from_config(config)
        settle_process()
        engine.start()
    except Exception as e:
        logger.exception("the model failed to load")
        state.load_error = f"{type(e).__name__}: {e}"
        server.should_exit = True
        return
    state.attach(engine)
    logger.info("model %s ready (max_model_len %d)", engine.model_name, engine.max_model_len)


async def _drain(state: ServerState) -> None:
    state.draining = True
    if state.engine is not None:
        await state.engine.shutdown(state.settings.shutdown_grace_seconds)
        logger.info("engine stopped")


class _Server(uvicorn.Server):
    """uvicorn, plus: the first SIGTERM/SIGINT also starts draining the engine."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.loop: asyncio.AbstractEventLoop | None = None
        self.drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if not self.should_exit and self.loop is not None:
            logger.info(
                "signal %d: draining for up to %.0f s", sig, self.state.settings.shutdown_grace_seconds
            )
            self.loop.call_soon_threadsafe(self._start_drain)
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        self.drain_task = asyncio.ensure_future(_drain(self.state))


def _exit_zero(sig: int, frame) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> None:
    try:
        settings = parse_settings(argv)  # bad values fail here, before anything starts
    except ValueError as e:
        sys.exit(f"leanserve: {e}")
    configure_logging(settings)
    app = create_app(settings)
    state: ServerState = app.state.server
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,  # our middleware writes one line per request
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) + 5,
    )
    server = _Server(config, state)
    threading.Thread(target=_load_engine, args=(state, server), name="leanserve-load", daemon=True).start()
    # uvicorn re-raises the signal it stopped on once it is done: by then we have drained, so exit 0.
    signal.signal(signal.SIGTERM, _exit_zero)
    signal.signal(signal.SIGINT, _exit_zero)
    server.run()
    if state.load_error:
        sys.exit(1)
