"""The HTTP edge of errors: domain exceptions -> the seed's or OpenAI's error shape.

Management endpoints answer ``{"success": false, "message", "error"}``; ``/v1/*`` answers
the OpenAI envelope ``{"error": {"message", "type", "code"}}`` (contract §6).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from llm_manager.errors import ManagerError

log = logging.getLogger(__name__)

_KINDS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def error_response(
    path: str,
    status: int,
    message: str,
    detail: str | None = None,
    kind: str | None = None,
    headers: dict[str, str] | None = None,
    openai: bool | None = None,
) -> JSONResponse:
    if openai is None:
        openai = path == "/v1" or path.startswith("/v1/")
    # A message may quote client input (a model name) holding lone surrogates, which
    # cannot be encoded as UTF-8: replaced, so that the error itself never fails.
    message = _encodable(message)
    detail = None if detail is None else _encodable(detail)
    if openai:
        body: dict[str, object] = {
            "error": {
                "message": message if detail is None else f"{message} ({detail})",
                "type": kind or _KINDS.get(status, "server_error"),
                "code": status,
            },
            "success": False,
            "message": message,
        }
    else:
        body = {"success": False, "message": message, "error": detail or message}
    return JSONResponse(body, status_code=status, headers=headers)


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


def from_error(path: str, exc: ManagerError, openai: bool | None = None) -> JSONResponse:
    return error_response(
        path, exc.status, exc.message, exc.detail, exc.kind, exc.headers, openai=openai
    )


def install(app: FastAPI) -> None:
    async def on_manager_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ManagerError)
        return from_error(request.url.path, exc)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        message = {404: "not found", 405: "method not allowed"}.get(exc.status_code)
        message = message or str(exc.detail)
        response = error_response(request.url.path, exc.status_code, message)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return error_response(request.url.path, 400, "invalid request", problems)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(request.url.path, 500, "internal error", repr(exc))

    app.add_exception_handler(ManagerError, on_manager_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)
