"""The service log's one line per record: control characters escaped in everything logged.

A value from a peer (a request path, a DICOM UID, an exception's message) may hold a
newline; written as is, it would start a line of its own, forged to look like any record.
``EscapingFormatter`` escapes, once for every call site, each C0 control character (CR, LF,
tab, ESC, ...), DEL, each C1 control character and the Unicode line and paragraph
separators of the formatted record: ``\\n``, ``\\r``, ``\\t``, otherwise ``\\xNN`` or
``\\uNNNN``. A traceback keeps its lines, each indented, so that a line of the log that does
not start with a space always starts a record.
"""

import logging
from types import TracebackType

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ESCAPES = {code: _NAMED.get(chr(code), f"\\x{code:02x}")
            for code in (*range(0x20), *range(0x7F, 0xA0))} | {
            0x2028: "\\u2028", 0x2029: "\\u2029"}
_INDENT = "    "


def escape_controls(text: str) -> str:
    """``text`` with its control characters and line separators escaped."""
    return text.translate(_ESCAPES)


def _indented(text: str) -> str:
    """A traceback or a stack, each line escaped and indented."""
    return "\n".join(_INDENT + escape_controls(line) for line in text.split("\n"))


class EscapingFormatter(logging.Formatter):
    """A ``logging.Formatter`` writing each record as one line, then any traceback indented."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        """The record's line, message and arguments included, escaped."""
        return escape_controls(super().formatMessage(record))

    def formatException(  # noqa: N802
            self, ei: tuple[type[BaseException], BaseException, TracebackType | None]
            | tuple[None, None, None]) -> str:
        """The traceback, escaped and indented."""
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        """The stack, escaped and indented."""
        return _indented(super().formatStack(stack_info))
