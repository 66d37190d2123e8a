"""The one rule for files named after data (benchmark ids, shard keys and names, captions): they are written only
inside their output folder.

Why one place: benchmark sources and shards are shared files, so an id like ``../../../victim-home/payload`` is
hostile input; every tool that turns data into a file name (``training/painterbench/manifest.py``,
``training/painterbench/evaluate.py --save_generated``, ``training/painterdata/captions.py``, the trainer's exports)
goes through :class:`OutputNames`, so the rule cannot drift between them.

The rule: a name becomes a single path component of safe characters (letters, digits, ``. _ -``; anything else,
``/``, ``\\`` and NUL included, becomes ``_``), never starting with ``.`` (no ``..``, no hidden files such as
``.bashrc``), at most :data:`MAX_NAME_BYTES` bytes. A name that had to change gets a short hash of the original, so
``a/b`` and ``a_b`` stay two files. Names that still meet (``Cat`` and ``cat`` are one file on case-insensitive disks)
are refused, never overwritten. The resolved final path is checked to be inside the resolved folder.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

__all__ = ["MAX_NAME_BYTES", "safe_stem", "OutputNames"]

#: Longest stem written (bytes of UTF-8); file systems allow 255 per component, suffixes need the rest.
MAX_NAME_BYTES = 120
_UNSAFE = re.compile(r"[^\w.\-]")


def _quote(name: str) -> str:
    return repr(name if len(name) <= 80 else name[:77] + "...")


def safe_stem(name: str) -> str:
    """``name`` as a safe file stem (see the module docstring); unchanged when it already is one."""
    if not isinstance(name, str):
        raise ValueError(f"a file name from data must be text, got {type(name).__name__}")
    cleaned = _UNSAFE.sub("_", name).lstrip(".")
    if cleaned == name and name and len(name.encode("utf-8")) <= MAX_NAME_BYTES:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    head = cleaned.encode("utf-8")[:MAX_NAME_BYTES - 11].decode("utf-8", "ignore").rstrip(".")
    return f"{head}-{digest}" if head else f"item-{digest}"


class OutputNames:
    """Files named after data inside one output folder: :meth:`path` maps (name, suffix) to a checked path and
    remembers it, so a second name landing on the same file is refused instead of overwriting the first.

    Call :meth:`path` for every item *before* writing any of them when a refusal must leave nothing behind.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._owners: dict[str, str] = {}

    def path(self, name: str, suffix: str = "", subfolder: str = "", owner: str | None = None) -> Path:
        """The path of the file for data name ``name`` (+ ``suffix`` such as ``.png``, chosen by the tool, never by
        data) under ``root/subfolder``. ``owner`` identifies the item when names may repeat legitimately (a shard's
        full path; default: the name). Raises ValueError when another item already owns that file or the path
        would leave the folder."""
        if suffix and not re.fullmatch(r"\.[A-Za-z0-9]{1,8}", suffix):
            raise ValueError(f"file suffix {_quote(suffix)} is not a plain extension like '.png'")
        file = f"{safe_stem(name)}{suffix}"
        relative = f"{subfolder}/{file}" if subfolder else file
        owner = name if owner is None else owner
        first = self._owners.setdefault(relative.casefold(), owner)
        if first != owner:
            raise ValueError(f"{_quote(first)} and {_quote(owner)} both map to the file {relative!r} in "
                             f"{self.root} (names differing only in unsafe characters or case, or equal names from "
                             "different folders); make them unique")
        target = self.root / relative
        root = self.root.resolve()
        if not target.resolve().is_relative_to(root):
            raise ValueError(f"{_quote(name)} would be written to {target.resolve()}, outside {root}")
        return target
