"""Numbers from untrusted text: query parameters, path segments, QIDO matching values.

``str.isdigit`` accepts ``"²"``, which ``int`` refuses; ``int`` accepts ``" 3 "``, ``"1_0"``
and ``"٣"``, ``float`` ``"nan"`` and ``"1e999"`` (infinity); both give values of any size,
which overflow further on (SQLite integers, DICOM tags, image sizes): 500s. Here the form is
checked first (ASCII digits, bounded length), then the range; anything else is a
``NumberError`` (a ``ValueError``) naming the parameter and its range, for a 400.
"""

import math
import re

_INTEGER = {10: re.compile(r"-?[0-9]{1,20}"), 16: re.compile(r"[0-9A-Fa-f]{1,16}")}
_DECIMAL = re.compile(r"-?(?:[0-9]{1,20}(?:\.[0-9]{0,20})?|\.[0-9]{1,20})"
                      r"(?:[eE][-+]?[0-9]{1,3})?")
INT32_MAX = (1 << 31) - 1  # the largest IS value (PS3.5 6.2)
INT64_MAX = (1 << 63) - 1  # the largest SQLite integer (row ids)


class NumberError(ValueError):
    """Text that is not a number of the form and range asked."""


def parse_int(text: str, name: str, low: int, high: int, *, base: int = 10) -> int:
    """``text`` as an integer from ``low`` to ``high``: decimal digits, after a ``-`` where
    ``low`` is negative, or hexadecimal digits (``base=16``); no space, ``+``, ``_`` or
    other scripts' digits."""
    if _INTEGER[base].fullmatch(text) and (low < 0 or not text.startswith("-")):
        value = int(text, base)
        if low <= value <= high:
            return value
    shown = (f"a hexadecimal number from {low:X} to {high:X}" if base == 16
             else f"a number from {low} to {high}")
    raise NumberError(f"{name} must be {shown}, not {text[:40]!r}")


def parse_decimal(text: str, name: str, low: float = -math.inf,
                  high: float = math.inf) -> float:
    """``text`` as a finite decimal number from ``low`` to ``high`` (``-12.5``, ``1e3``);
    no ``nan``, ``inf``, space or other scripts' digits."""
    if _DECIMAL.fullmatch(text):
        value = float(text)
        if math.isfinite(value) and low <= value <= high:
            return value
    shown = "a decimal number" + (f" from {low:g} to {high:g}" if math.isfinite(low) or
                                  math.isfinite(high) else "")
    raise NumberError(f"{name} must be {shown}, not {text[:40]!r}")
