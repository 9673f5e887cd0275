"""Log output of the ``forge-batch`` command: the level (``--log-level`` or ``FORGE_BATCH_LOG_LEVEL``) and the
format (``--log-format text`` for people, ``json`` for schedulers: one JSON object a line with ``time``,
``level``, ``event`` and ``fields``).

The library only logs (``logging.getLogger(__name__)``, with structured values passed as
``extra={"fields": {...}}``); handlers are set here, by the command line, never on import.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import sys
from typing import Any, TextIO

LOG_LEVEL_ENV = "FORGE_BATCH_LOG_LEVEL"
LEVELS = ("debug", "info", "warning", "error", "critical")
DEFAULT_LEVEL = "info"
FORMATS = ("text", "json")
ROOT_LOGGER = "forge_batch"
_HANDLER_NAME = "forge-batch-cli"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return dict(fields) if isinstance(fields, dict) else {}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``time`` (UTC, ISO 8601), ``level``, ``event`` (the message), ``logger``,
    ``fields`` (the record's structured values) and, for an exception, ``exception``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "logger": record.name,
            "fields": _fields(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``12:00:01 INFO    loaded model ... in 1.3 s``: the message says it all; fields only at debug level."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = _fields(record)
        if fields and record.levelno <= logging.DEBUG:
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return text


def resolve_level(level: str | None) -> str:
    """The level to use: ``level`` (the command line's), else ``FORGE_BATCH_LOG_LEVEL``, else ``info``.
    Raises ValueError naming the source of an unknown level."""
    source = "--log-level"
    if level is None:
        level, source = os.environ.get(LOG_LEVEL_ENV) or DEFAULT_LEVEL, LOG_LEVEL_ENV
    name = level.strip().lower()
    if name not in LEVELS:
        raise ValueError(f"{source}: unknown log level {level!r}; one of {', '.join(LEVELS)}")
    return name


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record arrives (a test's capture, a redirected stream)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self._fixed = stream

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return self._fixed or sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler.__init__ assigns it
        pass


class LoggingState:
    """The ``forge_batch`` logger's level, handlers and propagation, to put back after a command."""

    def __init__(self) -> None:
        logger = logging.getLogger(ROOT_LOGGER)
        self.level, self.handlers, self.propagate = logger.level, list(logger.handlers), logger.propagate

    def restore(self) -> None:
        logger = logging.getLogger(ROOT_LOGGER)
        logger.setLevel(self.level)
        logger.handlers[:] = self.handlers
        logger.propagate = self.propagate


def configure_logging(level: str | None = None, fmt: str = "text", stream: TextIO | None = None) -> str:
    """Send the ``forge_batch`` loggers' records at ``level`` and above to ``stream`` (default: stderr, as it
    is at each record) as ``fmt``; returns the level used. Calling it again replaces the handler it set
    (never adds a second)."""
    name = resolve_level(level)
    if fmt not in FORMATS:
        raise ValueError(f"--log-format: unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    logger = logging.getLogger(ROOT_LOGGER)
    for old in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
        logger.removeHandler(old)
    handler = _StderrHandler(stream)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(name.upper())
    logger.propagate = False  # the command owns the process's stderr: no second copy through the root logger
    return name
