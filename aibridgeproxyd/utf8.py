"""Text cut to a number of UTF-8 bytes, the bound of every recorded prompt, tool input and
thought (``record_max_bytes``)."""

from __future__ import annotations


def cut_utf8(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` UTF-8 bytes, never inside a character. A lone
    surrogate (JSON's ``\\ud800``), which UTF-8 cannot carry, becomes ``?``."""
    if len(text) <= max_bytes and text.isascii():
        return text  # one byte per character: nothing to cut, no surrogate (isascii is O(1))
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError:
        encoded = text.encode("utf-8", "replace")
        text = encoded.decode("utf-8")
    if len(encoded) <= max_bytes:
        return text
    # A cut inside a character leaves its first bytes at the end, which "ignore" drops.
    return encoded[:max_bytes].decode("utf-8", "ignore")
