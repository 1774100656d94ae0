"""`leanserve` / `python -m leanserve.server`: settings from the command line and LEANSERVE_* env vars;
uvicorn listens at once while the engine loads in the background (/health answers 503 until it is ready);
SIGTERM stops admitting, lets in-flight requests finish within the grace period (aborts the rest) and
exits 0. A model that fails to load exits 1."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import resource
import signal
import sys
import threading

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

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


_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\u2028\u2029]")


class TextLogFormatter(logging.Formatter):
    """`time LEVEL logger: message`, one line per record: control characters in the message (a client's
    text quoted in it, from any logger) are written as escapes, so none can start a forged line. A
    traceback, which is ours, keeps its lines."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _CONTROL_CHARS.sub(lambda m: ascii(m.group())[1:-1], record.message)
        return super().formatMessage(record)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter() if settings.log_format == "json" else TextLogFormatter())
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


class _H11Protocol(H11Protocol):
    """uvicorn's h11 protocol (h11 bounds the request head it buffers: `h11_max_incomplete_event_size`;
    httptools, uvicorn's faster parser, has no such bound), plus what uvicorn lacks: a deadline for the
    request head, from the connection's start or the end of its previous response until the head is
    complete (uvicorn's keep-alive timer stops at the first byte, so a client trickling or never finishing
    a head held its connection forever), and a hard cap on open connections: past twice
    `limit_concurrency` (where uvicorn answers 503) a new connection is closed at once."""

    def __init__(self, config: uvicorn.Config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        self.header_timeout: float = getattr(config, "header_timeout", 10.0)
        self.header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.limit_concurrency is not None and len(self.connections) > 2 * self.limit_concurrency:
            transport.abort()  # no parser state to answer from yet; the client sees a reset
            return
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the head is in (or the connection failed)
            self._head_done()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._await_head()  # of the next request on this connection

    def _await_head(self) -> None:
        self._head_done()
        self.header_deadline = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _head_done(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def _head_timed_out(self) -> None:
        self.header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            logger.info("closing a connection whose request head took over %.0f s", self.header_timeout)
            self.transport.close()


def uvicorn_config(app, settings: Settings, **overrides) -> uvicorn.Config:
    """The uvicorn configuration of the server (tests use it too): our h11 protocol and the connection
    limits of `settings`."""
    config = uvicorn.Config(
        app,
        http=_H11Protocol,
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_keep_alive=settings.keep_alive_timeout_seconds,  # type: ignore[arg-type]
        limit_concurrency=settings.max_connections,
        **overrides,
    )
    config.header_timeout = settings.header_timeout_seconds  # type: ignore[attr-defined]
    return config


def _raise_file_limit(settings: Settings) -> None:
    """Each connection is a file descriptor: lift the soft limit (often 1024) towards the hard one so that
    max_connections, and twice it before connections are refused, fit."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = 2 * settings.max_connections + 256
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    except (ValueError, OSError) as e:  # not permitted here: run with what we have
        logger.warning("could not raise the open-file limit: %s", e)


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
    _raise_file_limit(settings)
    config = uvicorn_config(
        app,
        settings,
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
