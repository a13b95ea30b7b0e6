"""Log lines a peer cannot forge, as text or as JSON lines.

Values a peer sends (a UID with a newline, a header quoted in an error, a library message about
hostile bytes) end up in log lines, the database and `status`. `escape` is the one place that
makes them printable; both formatters (`OneLineFormatter` for text, `JsonLineFormatter` for
`[log] format = "json"`) apply it to every log message the node writes, so a message reads the
same in both. `setup_logging` is the one logging setup, of the CLI and of the inference worker.
"""

from __future__ import annotations

import logging
import logging.handlers
import re
import sys
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter


def escape(text: str, limit: int | None = None) -> str:
    """`text` with every character that is not printable (control characters, line and
    paragraph separators) as its escape sequence; cut to `limit` characters first."""
    if limit is not None:
        text = text[:limit]
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


class LogFormat(StrEnum):
    """[log] format: how the node writes its log lines (to stderr)."""

    TEXT = "text"  # "TIME LEVEL LOGGER: message", a traceback on the lines after it
    JSON = "json"  # one JSON object per line: time, level, logger, process, message, exc_info


@dataclass(frozen=True)
class LogConfig:
    """[log] of config.toml (`dicom_node.app.config` reads it; a bad value is a ValueError
    naming the key, which the config loader reports as its ConfigError)."""

    format: LogFormat = LogFormat.TEXT

    def __post_init__(self) -> None:
        if self.format not in tuple(LogFormat):
            expected = " or ".join(repr(f.value) for f in LogFormat)
            raise ValueError(f"log.format: expected {expected}, got {self.format!r}")
        object.__setattr__(self, "format", LogFormat(self.format))


class OneLineFormatter(logging.Formatter):
    """Escapes control characters in messages, so that each record is one line; tracebacks
    stay multi-line."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        return escape(super().formatMessage(record))


class JsonLineFormatter(JsonFormatter):
    """python-json-logger's JSON lines, the message escaped as in text (JSON would escape
    control characters anyway; this keeps the message's text the same in both formats). A
    traceback is the `exc_info` string, inside the line."""

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        log_data["message"] = escape(str(log_data.get("message", "")))
        return log_data


_TEXT_FORMAT = "%(asctime)s %(levelname)s {process}%(name)s: %(message)s"
_JSON_FIELDS = ("asctime", "levelname", "name", "message")
_JSON_NAMES = {"asctime": "time", "levelname": "level", "name": "logger"}


def formatter(log_format: LogFormat, process: str = "node") -> logging.Formatter:
    """The node's formatter; `process` names the process that logs ("node", "worker")."""
    if LogFormat(log_format) == LogFormat.JSON:
        return JsonLineFormatter(
            list(_JSON_FIELDS),
            rename_fields=_JSON_NAMES,
            static_fields={"process": process},
        )
    prefix = "" if process == "node" else f"{process} "
    return OneLineFormatter(_TEXT_FORMAT.format(process=prefix))


def setup_logging(
    log_format: LogFormat | None = LogFormat.TEXT,
    level: int = logging.INFO,
    process: str = "node",
) -> None:
    """The root logger writes to stderr at `level` in `log_format`. Called again, it replaces
    the handler it set before (and leaves others, pytest's say, alone). `log_format` None: not
    known yet (the config file is still to be read): records are held, and written in the
    format of the next call, so that even the first lines of `serve` are in [log] format."""
    root = logging.getLogger()
    held: list[logging.LogRecord] = []
    for old in [h for h in root.handlers if isinstance(h, _NodeHandler | _HoldingHandler)]:
        root.removeHandler(old)
        if isinstance(old, _HoldingHandler):
            held += old.buffer
    root.setLevel(level)
    if log_format is None:
        root.addHandler(_HoldingHandler())
        return
    # Python's warnings (highdicom's among them) become log records, so they are redacted too.
    logging.captureWarnings(True)
    handler = _NodeHandler(sys.stderr)
    handler.setFormatter(formatter(log_format, process))
    root.addHandler(handler)
    for record in held:
        handler.handle(record)


# Libraries whose messages quote DICOM header values: pydicom's validation ("Invalid value for
# VR DA: '17.04.1923'", a birth date) and highdicom's person-name warning (a patient's name),
# the latter through Python's warnings. Their quoted values are redacted: no identifier in the
# node's log, whatever a sender puts in its headers.
_QUOTING_LIBRARIES = ("pydicom", "highdicom")
_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")


class _RedactQuotedValues(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "py.warnings" or record.name.split(".")[0] in _QUOTING_LIBRARIES:
            record.msg = _QUOTED.sub("<value>", record.getMessage())
            record.args = ()
        return True


class _NodeHandler(logging.StreamHandler[TextIO]):
    """The handler `setup_logging` installs (and replaces): library messages that quote header
    values are redacted (`_RedactQuotedValues`)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.addFilter(_RedactQuotedValues())


class _HoldingHandler(logging.handlers.BufferingHandler):
    """Holds records until `setup_logging` knows the format (never flushes by itself)."""

    def __init__(self) -> None:
        super().__init__(capacity=10_000)

    def shouldFlush(self, record: logging.LogRecord) -> bool:  # noqa: N802 (logging's name)
        if len(self.buffer) >= self.capacity:
            del self.buffer[0]  # the oldest go first: a flood before the setup stays bounded
        return False
