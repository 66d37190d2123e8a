"""Error-message helpers shared by the core's validators.

Shared files and workflows are untrusted: a bad value may be megabytes long, and an error message travels into the
log, ComfyUI's `/history` and every websocket client. Messages therefore quote at most `QUOTE_LIMIT` characters of
any input they name.
"""
from __future__ import annotations

import reprlib
from typing import Any

QUOTE_LIMIT = 200


def quote(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """`repr(value)` cut to `limit` characters, saying when it was cut.

    `reprlib` bounds every level (items per container, nesting depth, string length) before anything is formatted,
    so quoting a 5 MB list or a 10 000-deep nesting costs no more than quoting a number.
    """
    shortener = reprlib.Repr()
    shortener.maxlevel = 4
    shortener.maxlist = shortener.maxtuple = shortener.maxdict = shortener.maxset = 16
    shortener.maxstring = shortener.maxother = shortener.maxlong = limit
    try:
        text = shortener.repr(value)
    except ValueError:  # an int past Python's 4300-digit str() limit, alone or inside a container
        digits = f"about {int(value.bit_length() * 0.30103) + 1}-digit " if isinstance(value, int) else ""
        text = f"<{digits}{type(value).__name__} too large to show>"
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…"
