"""Log lines a peer cannot forge.

Values a peer sends (a UID with a newline, a header quoted in an error, a library message about
hostile bytes) end up in log lines, the database and `status`. `escape` is the one place that
makes them printable; `OneLineFormatter` applies it to every log message the node writes.
"""

from __future__ import annotations

import logging


def escape(text: str, limit: int | None = None) -> str:
    """`text` with every character that is not printable (control characters, line and
    paragraph separators) as its escape sequence; cut to `limit` characters first."""
    if limit is not None:
        text = text[:limit]
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


class OneLineFormatter(logging.Formatter):
    """Escapes control characters in messages, so that each record is one line; tracebacks
    stay multi-line."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        return escape(super().formatMessage(record))
