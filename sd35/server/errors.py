"""One table from an error's kind to an HTTP status, and the error body each API family's clients expect.

| kind (sd35.errors)                  | status | OpenAI / native ``error.type`` |
|-------------------------------------|--------|--------------------------------|
| InvalidRequest, Unsupported, others | 400    | invalid_request_error          |
| (missing or wrong credentials)      | 401    | authentication_error           |
| NotFound                            | 404    | invalid_request_error (code model_not_found for a model) |
| Conflict, Cancelled                 | 409    | invalid_request_error          |
| (body too large)                    | 413    | invalid_request_error          |
| Busy                                | 429    | rate_limit_error (+ Retry-After) |
| anything else                       | 500    | server_error (message sanitised, logged) |

OpenAI's routes and the native ones answer ``{"error": {"message", "type", "param", "code"}}``; A1111's
answer ``{"error": KIND, "detail": message, "body": "", "errors": message}`` as A1111's API does. A body
that does not parse is a 400 (A1111: 422, as FastAPI answers there) naming the field.
"""

from __future__ import annotations

import logging
from typing import Literal

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from sd35.errors import Busy, Cancelled, Conflict, NotFound, SD35Error

log = logging.getLogger("sd35.server")

Family = Literal["native", "openai", "a1111"]
RETRY_AFTER_S = 5

STATUS: dict[type[SD35Error], int] = {NotFound: 404, Conflict: 409, Cancelled: 409, Busy: 429}


def status_of(kind: str | type[SD35Error]) -> int:
    """The HTTP status of an error kind (a class, or its name as a job record stores it)."""
    if isinstance(kind, str):
        return next(
            (s for k, s in STATUS.items() if k.__name__ == kind), 500 if kind == "InternalError" else 400
        )
    return next((s for k, s in STATUS.items() if issubclass(kind, k)), 400)


def family_of(path: str) -> Family:
    if path.startswith(("/sdapi/", "/controlnet/")):
        return "a1111"
    if path.startswith(("/v1/images/generations", "/v1/images/edits", "/v1/models")):
        return "openai"
    return "native"


_OPENAI_TYPES = {401: "authentication_error", 429: "rate_limit_error", 500: "server_error"}
_CODES = {
    401: "invalid_api_key",
    404: "not_found",
    409: "conflict",
    413: "payload_too_large",
    429: "rate_limit_exceeded",
}


def error_response(
    path: str, status: int, message: str, *, kind: str = "InvalidRequest", param: str | None = None
) -> JSONResponse:
    """The error body of ``path``'s API family, with ``status``."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if family_of(path) == "a1111":
        body: dict = {"error": kind, "detail": message, "body": "", "errors": message}
    else:
        code = "model_not_found" if status == 404 and param == "model" else _CODES.get(status)
        body = {
            "error": {
                "message": message,
                "type": _OPENAI_TYPES.get(status, "invalid_request_error"),
                "param": param,
                "code": code,
            }
        }
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "the request body could not be read.", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    field = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON.", None
    if first.get("type") == "missing":
        return f"{field} is required.", field
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{field + ': ' if field else ''}{message}{more}.", field


def install(app) -> None:
    """Route every error through the table above."""

    @app.exception_handler(SD35Error)
    async def sd35_error(request: Request, exc: SD35Error) -> JSONResponse:
        return error_response(
            request.url.path, status_of(type(exc)), exc.message, kind=type(exc).__name__, param=exc.param
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, field = _validation_message(exc)
        status = 422 if family_of(request.url.path) == "a1111" else 400
        return error_response(request.url.path, status, message, param=field)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}."
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}."
        return error_response(request.url.path, exc.status_code, message, kind="HTTPError")

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(
            request.url.path, 500, "the server failed on this request (see its log).", kind="InternalError"
        )
