"""Exceptions -> HTTP status + OpenAI error JSON, in one place.

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

RequestError (a bad field) -> 400 naming the field in `param`; APIError carries its own status
(401, 404, 413, ...); a client that went away -> 499 (nobody reads it); EngineError and anything
unexpected -> 500. `install()` registers the one handler for all of them on the app; `sse()` uses
`report()` for errors that arrive after a stream has started.
"""
from __future__ import annotations

import logging
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..errors import GemforgeError, RequestError
from .protocol import ErrorBody, ErrorResponse

log = logging.getLogger("gemforge.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 499: "client_disconnected",
          500: "internal_server_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error response decided by the server itself (auth, size limits, unknown model)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorBody(message=self.message, type=_TYPES.get(self.status, "error"),
                                             param=self.param, code=self.code))


def api_error(exc: BaseException) -> APIError:
    """The one mapping from an exception to the error the client sees."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestError):
        return APIError(400, str(exc), exc.field)
    if isinstance(exc, HTTPException):
        return APIError(exc.status_code, str(exc.detail))
    if isinstance(exc, ClientDisconnect):
        return APIError(499, "client disconnected")
    if isinstance(exc, GemforgeError):  # EngineError: a failed step, a dead engine
        return APIError(500, f"engine error: {exc}")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}")


def report(exc: BaseException) -> APIError:
    """api_error(exc), logging server-side failures with their traceback."""
    err = api_error(exc)
    if err.status >= 500:
        log.error("request failed: %s", err.message, exc_info=(type(exc), exc, exc.__traceback__))
    return err


def install(app: FastAPI, on_error: Callable[[APIError], None]) -> None:
    """Route every exception through `api_error`; `on_error` sees each error (for metrics)."""

    async def handler(request: Request, exc: Exception) -> JSONResponse:
        err = report(exc)
        on_error(err)
        return JSONResponse(err.response().model_dump(), status_code=err.status)

    for cls in (APIError, GemforgeError, HTTPException, ClientDisconnect, Exception):
        app.add_exception_handler(cls, handler)
