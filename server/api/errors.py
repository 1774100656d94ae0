"""OpenAI-shaped errors `{"error": {"message", "type", "param", "code"}}`: the exception routes raise,
and the handlers that give the same shape to validation failures (400, never 422), unknown routes (404),
oversized bodies (413) and our own bugs (500)."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from leanserve.server.engine.sampling_params import InvalidParameter

logger = logging.getLogger("leanserve.errors")

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error for the client; `param` names the offending request field when there is one."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        error_type = _TYPE_BY_STATUS.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error"
        )
        return {
            "error": {"message": self.message, "type": error_type, "param": self.param, "code": self.code}
        }

    def sse_event(self) -> str:
        """The error as the final event of a stream that has already started."""
        return f"data: {json.dumps(self.body())}\n\n"


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value" if param else None)


def parameter_error(error: InvalidParameter, names: dict[str, str] | None = None) -> APIError:
    """The engine's InvalidParameter as a 400 under the client's name of the parameter, in its message too
    (`names`: the client's name of an engine parameter where they differ, e.g. chat's top_logprobs)."""
    param = (names or {}).get(error.param, error.param)
    return bad_request(error.message.replace(f"'{error.param}'", f"'{param}'"), param)


def _response(request: Request, error: APIError) -> JSONResponse:
    headers = dict(error.headers)
    request_id = getattr(request.state, "request_id", None)
    if request_id:
        headers["X-Request-Id"] = request_id
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _param_of(loc: tuple) -> str | None:
    """Top-level request field of a pydantic error location ("body", field, ...)."""
    return loc[1] if len(loc) > 1 and loc[0] == "body" and isinstance(loc[1], str) else None


def _validation_message(error: dict) -> str:
    if error.get("type") == "json_invalid":
        return f"malformed JSON: {error.get('ctx', {}).get('error', 'decode error')}"
    where = ".".join(str(part) for part in error.get("loc", ())[1:])
    return f"{error.get('msg', 'invalid value')}" + (f" (at '{where}')" if where else "")


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return _response(request, exc)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    param = _param_of(tuple(first.get("loc", ())))
    return _response(request, bad_request(_validation_message(first), param))


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    return _response(request, APIError(exc.status_code, message, headers=dict(exc.headers or {})))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    # Starlette re-raises after this answer and uvicorn then drops the connection: say so, or a client's
    # next request on the kept-alive connection is reset.
    error = APIError(500, "internal server error", code="internal_error", headers={"Connection": "close"})
    return _response(request, error)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
