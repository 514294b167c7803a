"""Every error leaves as ``application/problem+json`` (RFC 9457); one handler per kind."""

from __future__ import annotations

import logging

import redis
from flask import Flask, jsonify
from kombu.exceptions import OperationalError
from werkzeug.exceptions import HTTPException

from domain.errors import MaskqError

log = logging.getLogger(__name__)


def problem(status: int, title: str, detail: str, errors: list[dict] | None = None, headers: dict | None = None):
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    if errors:
        body["errors"] = errors
    response = jsonify(body)
    response.status_code = status
    response.mimetype = "application/problem+json"
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(MaskqError)
    def _maskq(exc: MaskqError):
        if exc.status >= 500:
            log.warning("%s: %s", exc.title, exc.detail)
        retry_after = getattr(exc, "retry_after", None)  # ServiceUnavailable, TooManyRequests
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return problem(exc.status, exc.title, exc.detail, exc.errors, headers)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        detail = exc.description or exc.name
        if exc.code == 413:
            detail = "the request body is larger than this service accepts"
        # RFC 9110: a 405 says which methods the resource has.
        allow = getattr(exc, "valid_methods", None)
        return problem(exc.code or 500, exc.name, detail, headers={"Allow": ", ".join(allow)} if allow else None)

    # kombu wraps a Redis error while it sends a job's message (OperationalError): the same outage. The record
    # written before it is marked unsent, and recovery sends it (README, "A job whose sender died").
    @app.errorhandler(redis.RedisError)
    @app.errorhandler(OperationalError)
    def _redis(exc: Exception):
        log.warning("Redis unavailable: %s", exc)
        return problem(
            503,
            "Service unavailable",
            "the job store cannot be reached; try again shortly",
            headers={"Retry-After": "5"},
        )

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unexpected error")
        return problem(500, "Internal error", "an unexpected error occurred; it has been logged")
