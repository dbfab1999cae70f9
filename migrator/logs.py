"""Logging, configured in exactly one place.

Console rendering on a TTY, JSON lines otherwise; every event passes through ``redact`` so no
secret reaches a log.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from migrator.redact import redact

LEVELS = ("debug", "info", "warning", "error")


def _redact_processor(_logger: Any, _name: str, event_dict: dict) -> dict:
    return redact(event_dict)


def configure(fmt: str = "auto", level: str = "info", stream=None) -> None:
    """Configure structlog for the whole process. ``fmt`` is ``auto``, ``console`` or ``json``."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    renderer = (
        structlog.dev.ConsoleRenderer(colors=getattr(stream, "isatty", lambda: False)())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str | None = None, **bound: Any):
    return structlog.get_logger(name, **bound) if name else structlog.get_logger(**bound)
