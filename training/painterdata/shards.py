"""The BrushData / PainterData shard format, in one place: shard lists, tar iteration grouped by sample key, the
segmentation JSON and its RLE, the image and size members, and the local-caption members PainterData adds.

Format (webdataset tar shards; a sample is the run of consecutive members sharing a key, the name up to the first
'.' of the file name; the rest is the member's extension):

* ``.image`` jpg/png/webp bytes; ``.caption`` the global caption; ``.height`` / ``.width`` text integers;
* ``.segmentation`` JSON ``{"mask": [rle, ...]}``, one RLE per object: flat 1-based (start, length) pairs over the
  image flattened in **column-major** order (:func:`rle_decode`);
* ``.local_caption`` (PainterData, written by ``training/painterdata/captions.py``): a JSON list aligned with the
  masks, the kept caption or ``null`` (empty mask, empty caption, or rejected by the CLIP filter); older data may
  hold plain text describing the *first* object;
* ``.local_caption_meta``: JSON list, same alignment, ``{"caption", "short", "clip"}`` per non-empty mask.

Why one owner: the trainer's data pipeline, the captioner and the benchmark builder must read the same masks in the
same order, or captions end up on the wrong objects; a second reader is how that drifts. This module imports
neither the trainer nor the evaluation (the rooms test enforces it).
"""
from __future__ import annotations

import io
import json
import logging
import re
import shlex
import subprocess
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

logger = logging.getLogger("painternet.training")

__all__ = [
    "LOCAL_CAPTION",
    "LOCAL_CAPTION_META",
    "MalformedSample",
    "ShardSample",
    "rle_decode",
    "segmentation_rles",
    "decode_segmentation",
    "local_captions",
    "first_object_only",
    "local_caption_members",
    "decode_image",
    "member_text",
    "member_int",
    "member_ext",
    "list_shards",
    "iter_shard",
]

#: Member extensions PainterData adds to a BrushData sample.
LOCAL_CAPTION = "local_caption"
LOCAL_CAPTION_META = "local_caption_meta"

_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


class MalformedSample(ValueError):
    """A sample that cannot be used (missing member, undecodable image, bad RLE...). Readers skip and count it."""


@dataclass
class ShardSample:
    """One sample of a shard: its key and its members in tar order as (member name, bytes, tar header)."""

    key: str
    members: list[tuple[str, bytes, tarfile.TarInfo]]

    def by_ext(self) -> dict[str, bytes]:
        """Members by lower-cased extension (``image``, ``caption``, ``segmentation``...), as webdataset names them."""
        return {member_ext(name).lower(): payload for name, payload, _ in self.members}


# ----------------------------------------------------------------------------------------------------------- members
def member_ext(name: str) -> str:
    """The webdataset extension of a member name (everything after the first '.' of the file name)."""
    match = _KEY.match(name)
    return match.group(2) if match else ""


def member_text(data: bytes | str) -> str:
    """A text member (UTF-8)."""
    return data.decode("utf-8") if isinstance(data, bytes) else data


def member_int(data: bytes | str | None) -> int | None:
    """A ``.height`` / ``.width`` member as an int; None when absent or not an integer."""
    if data is None:
        return None
    try:
        return int(member_text(data).strip())
    except (ValueError, UnicodeDecodeError):
        return None


def decode_image(data: bytes) -> np.ndarray:
    """Image bytes (jpg/png/webp...) → (H, W, 3) uint8 RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise MalformedSample(f"image cannot be decoded: {error}") from error


# ------------------------------------------------------------------------------------------------------ segmentation
def rle_decode(rle: Sequence[int] | str, height: int, width: int) -> np.ndarray:
    """Decode BrushData's RLE into an (height, width) uint8 {0, 1} mask.

    Format: flat 1-based (start, length) pairs over the image flattened in **column-major** (Fortran) order, as a
    list of ints or a whitespace-separated string. Why strict checks: a wrong height/width or a truncated RLE would
    otherwise silently produce a shifted mask that trains the branch on the wrong region.
    """
    try:
        values = np.asarray(rle.split() if isinstance(rle, str) else rle, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as error:
        raise MalformedSample(f"RLE is not a list of integers: {str(rle)[:60]!r}") from error
    if values.size % 2:
        raise MalformedSample(f"RLE has an odd number of values ({values.size}); it must be (start, length) pairs")
    starts, lengths = values[0::2] - 1, values[1::2]
    total = height * width
    if values.size and (starts.min() < 0 or lengths.min() < 0 or (starts + lengths).max() > total):
        raise MalformedSample(f"RLE runs leave the {height}x{width} image (starts are 1-based, ends ≤ {total})")
    flat = np.zeros(total, dtype=np.uint8)
    for start, length in zip(starts.tolist(), lengths.tolist()):
        flat[start:start + length] = 1
    return flat.reshape((height, width), order="F")


def segmentation_rles(payload: bytes | str) -> list[Any]:
    """The RLE of every object of a ``.segmentation`` member, undecoded (the trainer decodes only the one it picks)."""
    try:
        data = json.loads(member_text(payload))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MalformedSample(f"segmentation is not JSON: {error}") from error
    rles = data.get("mask") if isinstance(data, dict) else None
    if not isinstance(rles, list):
        raise MalformedSample('segmentation JSON must be {"mask": [rle, ...]}')
    return rles


def decode_segmentation(payload: bytes | str, height: int, width: int) -> list[np.ndarray]:
    """A ``.segmentation`` member → one float32 {0, 1} (height, width) mask per object, in member order."""
    return [rle_decode(rle, height, width).astype(np.float32) for rle in segmentation_rles(payload)]


# ---------------------------------------------------------------------------------------------------- local captions
def local_captions(payload: bytes | str | None, count: int) -> list[str | None]:
    """The ``.local_caption`` member as one entry per object: the kept caption, or None (no member, ``null``, "").

    A plain-text member (older data) describes the first object only. A JSON list of the wrong length, or with
    entries that are neither strings nor null, is malformed: it could not be aligned with the masks.
    """
    captions: list[str | None] = [None] * count
    if payload is None:
        return captions
    text = member_text(payload).strip()
    if text.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise MalformedSample(f"local_caption is not a JSON list: {error}") from error
        if len(values) != count or not all(v is None or isinstance(v, str) for v in values):
            raise MalformedSample(f"local_caption list has {len(values)} entries for {count} masks "
                                  "(must be aligned strings/null)")
        return [v.strip() if isinstance(v, str) and v.strip() else None for v in values]
    if count:
        captions[0] = text or None
    return captions


def first_object_only(payload: bytes | str | None) -> bool:
    """True for a plain-text ``.local_caption`` (older data): it describes the first object, which must be chosen."""
    return payload is not None and not member_text(payload).strip().startswith("[")


def local_caption_members(captions: Sequence[str | None],
                          meta: Sequence[dict[str, Any] | None]) -> dict[str, bytes]:
    """The two PainterData members of one sample, ready to write (JSON lists aligned with the masks)."""
    if len(captions) != len(meta):
        raise ValueError(f"{len(captions)} captions for {len(meta)} meta entries; both align with the masks")
    return {LOCAL_CAPTION: json.dumps(list(captions), ensure_ascii=False).encode("utf-8"),
            LOCAL_CAPTION_META: json.dumps(list(meta), ensure_ascii=False).encode("utf-8")}


# ------------------------------------------------------------------------------------------------------------ shards
def list_shards(paths: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard URLs from folders (their ``*.tar``, sorted), files, brace patterns (``shards/{00000..00099}.tar``) and
    ``pipe:COMMAND`` URLs (read from the command's stdout, e.g. ``pipe:aws s3 cp s3://b/0.tar -``)."""
    from braceexpand import braceexpand

    entries = [paths] if isinstance(paths, (str, Path)) else list(paths)
    shards: list[str] = []
    for entry in entries:
        text = str(entry)
        if text.startswith("pipe:"):
            shards.append(text)
            continue
        path = Path(text).expanduser()
        if path.is_dir():
            found = sorted(str(p) for p in path.glob("*.tar"))
            if not found:
                raise ValueError(f"no *.tar shards in directory {path}; point at the shard folder or a brace "
                                 "pattern like 'shards/{00000..00099}.tar'.")
            shards += found
        elif path.is_file():
            shards.append(str(path))
        else:
            expanded = [str(Path(p).expanduser()) for p in braceexpand(text)]
            if expanded == [str(path)] or not all(Path(p).is_file() for p in expanded):
                missing = next((p for p in expanded if not Path(p).is_file()), text)
                raise ValueError(f"shard path {missing!r} does not exist; pass .tar files, folders of them, brace "
                                 "patterns or pipe: URLs")
            shards += expanded
    if not shards:
        raise ValueError("the shard list is empty; pass at least one .tar path or folder.")
    return shards


def _open(url: str) -> tuple[BinaryIO, subprocess.Popen[bytes] | None]:
    if url.startswith("pipe:"):
        process = subprocess.Popen(shlex.split(url[5:]), stdout=subprocess.PIPE)
        assert process.stdout is not None
        return process.stdout, process
    return open(url, "rb"), None


def iter_shard(url: str | Path) -> Iterator[ShardSample]:
    """The samples of one shard in tar order (streamed: ``pipe:`` URLs and huge shards are never seeked).

    Members without an extension are skipped with a warning; a corrupt tar raises ``tarfile.TarError`` (callers
    that skip bad shards catch it). Payloads are read, never decoded: the caller decides what to decode.
    """
    handle, process = _open(str(url))
    try:
        with tarfile.open(fileobj=handle, mode="r|*") as archive:
            sample: ShardSample | None = None
            for info in archive:
                if not info.isfile():
                    continue
                match = _KEY.match(info.name)
                if match is None:
                    logger.warning("%s: member %r has no extension; skipped", url, info.name)
                    continue
                extracted = archive.extractfile(info)
                payload = extracted.read() if extracted is not None else b""
                if sample is not None and match.group(1) != sample.key:
                    yield sample
                    sample = None
                if sample is None:
                    sample = ShardSample(match.group(1), [])
                sample.members.append((info.name, payload, info))
            if sample is not None:
                yield sample
    finally:
        handle.close()
        if process is not None:
            if process.poll() is None:  # the reader stopped early: the command must not block on a full pipe
                process.terminate()
            process.wait()
