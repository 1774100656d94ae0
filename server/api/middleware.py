"""ASGI middleware around every request: its id (X-Request-Id honoured when sane, echoed back), its
arrival time, the API key on the model's routes, the request body size limit, and one log line when it
ends."""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from leanserve.server.api.errors import APIError

access_logger = logging.getLogger("leanserve.access")

STATUS_CLIENT_GONE = 499  # nginx's convention, only ever seen in our own log line
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_ID_PREFIX = {"/v1/completions": "cmpl-", "/v1/chat/completions": "chatcmpl-"}
# Routes outside /v1 that need the API key: vLLM leaves them open, but they run the tokenizer and the
# chat template on any input, which a key-protected server should not offer to everyone.
_KEYED_ROUTES = ("/tokenize", "/detokenize")
# Log values written bare in the text format; anything else (the path, which the client writes and the
# server percent-decodes: %0a, %20, %00) is quoted JSON-style, so no value can forge a line or a field.
_BARE_LOG_VALUE = re.compile(r"[A-Za-z0-9._:/+~@,\-]+")


def log_value(value: Any) -> str:
    """A value for a `key=value` text log line: bare when plainly safe, else a quoted, escaped string."""
    text = str(value)
    return text if _BARE_LOG_VALUE.fullmatch(text) else json.dumps(text)


def _content_length(headers: dict[str, str]) -> int:
    value = headers.get("content-length", "")
    return int(value) if value.isdigit() else 0  # the server rejects malformed ones before us


def _body_too_large(limit: int) -> APIError:
    return APIError(413, f"request body larger than {limit} bytes", code="body_too_large")


class RequestMiddleware:
    """Request id (X-Request-Id honoured when sane, echoed back), arrival time, API key on /v1 routes and
    /tokenize, /detokenize, the body size limit and the per-request log line (fields left by the route in
    `request.state.log_fields`)."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrival = time.monotonic()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        sent_id = headers.get("x-request-id", "")
        path = scope["path"]
        request_id = (
            sent_id if _REQUEST_ID.fullmatch(sent_id) else _ID_PREFIX.get(path, "req-") + uuid.uuid4().hex
        )
        log_fields: dict[str, Any] = {}
        scope.setdefault("state", {}).update(request_id=request_id, arrival=arrival, log_fields=log_fields)
        status = STATUS_CLIENT_GONE

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"x-request-id" for name, _ in headers):
                    headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
            await send(message)

        try:
            keyed = path.startswith("/v1") or path in _KEYED_ROUTES
            if sum(name.lower() == b"authorization" for name, _ in scope["headers"]) > 1:
                # Which one counts would depend on who reads them (a proxy may check the first, we the
                # last): an ambiguous credential is refused, whatever the route.
                error = APIError(400, "more than one Authorization header", code="duplicate_authorization")
                await JSONResponse(error.body(), status_code=400)(scope, receive, send_with_id)
            elif self.api_key and keyed and not self._authorized(headers):
                error = APIError(401, "missing or invalid API key", code="invalid_api_key")
                response = JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send_with_id)
            elif _content_length(headers) > self.max_body_bytes:
                response = JSONResponse(_body_too_large(self.max_body_bytes).body(), status_code=413)
                await response(scope, receive, send_with_id)
            else:
                await self.app(scope, self._limited(receive), send_with_id)
        except Exception:
            status = 500
            raise
        finally:
            fields = {"request_id": request_id, "method": scope["method"], "path": path, "status": status}
            fields |= log_fields | {"latency_ms": round((time.monotonic() - arrival) * 1e3, 2)}
            line = " ".join(f"{k}={log_value(v)}" for k, v in fields.items())
            access_logger.info("%s", line, extra={"fields": fields})

    def _limited(self, receive: Receive) -> Receive:
        """`receive` that fails once the body (chunked, no Content-Length) outgrows the limit."""
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                error = _body_too_large(self.max_body_bytes)
                raise HTTPException(413, error.message)  # FastAPI passes HTTPExceptions from body reads on
            return message

        return receive_limited

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key or b"")
