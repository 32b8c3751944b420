"""Human-scaled numbers: formatting counts and bytes, and parsing them back.

Counts (params, MACs, FLOPs) use SI prefixes (25.6M, 4.09G); bytes use IEC prefixes
(44.6 MiB). The unit word (MACs, FLOPs, params) is always printed next to the number
by the caller, so a MAC count is never mistaken for a FLOP count.
"""

from __future__ import annotations

import re

_SI = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")]
_IEC = [(2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")]


def format_count(value: float, digits: int = 3) -> str:
    """``25557032 -> '25.6M'``, ``4089184256 -> '4.09G'``, ``512 -> '512'``."""
    v = float(value)
    for scale, suffix in _SI:
        if abs(v) >= scale:
            return f"{_sig(v / scale, digits)}{suffix}"
    return _sig(v, digits) if v != int(v) else str(int(v))


_SI_BYTES = [(1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")]


def format_bytes(value: float, digits: int = 3, si: bool = False) -> str:
    """``46758048 -> '44.6 MiB'``; with ``si`` (the user wrote MB, GB), ``'46.8 MB'``."""
    v = float(value)
    for scale, suffix in (_SI_BYTES if si else _IEC):
        if abs(v) >= scale:
            return f"{_sig(v / scale, digits)} {suffix}"
    return f"{int(v)} B"


def format_seconds(value: float, digits: int = 3) -> str:
    """``2.664 -> '2.66 s'``, ``0.0123 -> '12.3 ms'``, ``4.2e-5 -> '42 µs'``: never an exponent."""
    v = float(value)
    for scale, suffix in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if abs(v) >= scale:
            return f"{_sig(v / scale, digits)} {suffix}"
    return f"{_sig(v / 1e-9, digits)} ns" if v else "0 s"


class SizeText(float):
    """A byte count that remembers the prefixes the user wrote it with (``style``: "si" for 50MB, "iec" for
    512MiB), so messages answer in the same terms."""

    style: str | None = None

    def __new__(cls, value: float, style: str | None = None):
        obj = super().__new__(cls, value)
        obj.style = style
        return obj


def byte_style(text) -> str | None:
    """Which prefixes a user's size used: ``'50MB' -> 'si'``, ``'512MiB' -> 'iec'``, a bare number → None."""
    m = re.fullmatch(_NUMBER + r"([A-Za-zµ]*)\s*", str(text))
    if not m or m.group(2) in ("", "b", "B"):
        return None
    return "iec" if "i" in m.group(2) else "si"


def _sig(v: float, digits: int) -> str:
    """Format with ``digits`` significant digits, no exponent, no trailing zeros."""
    if v == 0:
        return "0"
    mag = len(str(int(abs(v)))) if abs(v) >= 1 else 1
    decimals = max(digits - mag, 0)
    text = f"{v:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


_COUNT_SUFFIX = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "B": 1e9, "T": 1e12}
_BYTE_SUFFIX = {
    "b": 1, "B": 1,
    "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
}
_TIME_SUFFIX = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}
_NUMBER = r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*"


def parse_count(text: str | int | float) -> float:
    """``'25M' -> 25e6``, ``'4.1G' -> 4.1e9``; a bare number is taken as is."""
    return _parse(text, _COUNT_SUFFIX, "a count such as 25M or 4.1G")


def parse_bytes(text: str | int | float) -> float:
    """``'512MiB' -> 536870912``, ``'100MB' -> 1e8``; a bare number is bytes."""
    return _parse(text, _BYTE_SUFFIX, "a size such as 512MiB or 100MB", bare_ok=True)


def parse_seconds(text: str | int | float) -> float:
    """``'12ms' -> 0.012``; a bare number is seconds."""
    return _parse(text, _TIME_SUFFIX, "a time such as 12ms or 0.5s", bare_ok=True)


def _parse(text, suffixes: dict, expected: str, bare_ok: bool = True) -> float:
    if isinstance(text, bool):
        raise ValueError(f"expected {expected}, got {text!r}")
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(_NUMBER + r"([A-Za-zµ]*)\s*", str(text))
    if not m or (m.group(2) not in suffixes and not (bare_ok and m.group(2) == "")):
        raise ValueError(f"expected {expected}, got {text!r}")
    return float(m.group(1)) * suffixes.get(m.group(2), 1)
