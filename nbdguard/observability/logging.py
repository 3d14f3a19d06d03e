"""structlog setup: JSON lines for machines, readable console output for people; lines a
client can cause once per request are rate-limited (see `ratelimit`)."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from nbdguard.observability.ratelimit import SUPPRESSED_EVENT, LogRateLimiter

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


_SUMMARY_LEVELS = frozenset({"debug", "info", "warning", "error", "critical"})


def _log_summary(level: str, fields: dict[str, Any]) -> None:
    """Log a `log.suppressed` summary at the level of the lines it counts."""
    logger = structlog.get_logger("nbdguard")
    method = level if level in _SUMMARY_LEVELS else "warning"
    getattr(logger, method)(SUPPRESSED_EVENT, **fields)


def configure_logging(
    log_format: str = "auto", level: str = "info", *, limiter: LogRateLimiter | None = None
) -> LogRateLimiter:
    """Route structlog events to stderr; `auto` means JSON unless stderr is a terminal.
    Returns the rate limiter installed (`limiter`, or one with the defaults), whose
    `flush()` logs what it still holds back."""
    if limiter is None:
        limiter = LogRateLimiter(_log_summary)
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            limiter,  # before anything is spent on a line that may be dropped
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    return limiter


def get_logger(**context: Any) -> Any:
    """A bound logger; every event name is a stable dotted string such as `export.opened`."""
    return structlog.get_logger("nbdguard").bind(**context)
