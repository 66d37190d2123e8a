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

Hostile and unlucky data (shards are shared files): every decoder here bounds its cost before spending it and fails
with :class:`MalformedSample`, and :class:`SampleGuard` (used by all three readers) turns *any* failure of one sample
into one log line with shard + key + reason, a count, and a skip. The bounds: a member whose tar header claims more
than :data:`MAX_MEMBER_BYTES` is never read (a gzip of zeros inflating to 7 GiB costs its decompression time, not
its size in memory); an image whose header claims more than :data:`MAX_IMAGE_PIXELS` is never decoded; JSON members
are capped at :data:`MAX_JSON_BYTES`, nesting beyond the parser's recursion limit is refused and the structure is
fixed (``{"mask": [rle, ...]}``, a list of strings/null), so deeper documents are refused too; RLE values must be
plain integers inside the image (``2**64``, floats, booleans and nested lists are refused), and at most two per
pixel; captions must be text, not JSON objects or lists.

A truncated or corrupt shard loses only the damaged sample: every sample before the damage is yielded (a sample is
handed out as soon as the next key's header is read, before that member's bytes), the damaged one is dropped and
:class:`DamagedShard` names it; a stream cannot be read past the damage, so the rest of that shard is not reached.
A shard cut exactly at a member boundary ends there like a complete one; its last sample is used when it has every
member it needs.
"""
from __future__ import annotations

import io
import json
import logging
import re
import shlex
import subprocess
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np

logger = logging.getLogger("painternet.training")

__all__ = [
    "LOCAL_CAPTION",
    "LOCAL_CAPTION_META",
    "MAX_MEMBER_BYTES",
    "MAX_IMAGE_PIXELS",
    "MAX_JSON_BYTES",
    "MAX_TEXT_BYTES",
    "MalformedSample",
    "DamagedShard",
    "SampleGuard",
    "ShardSample",
    "image_header",
    "member_caption",
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

#: Largest tar member read into memory (its header's size, checked before reading). An 8192² PNG is under 200 MiB.
MAX_MEMBER_BYTES = 256 * 2**20
#: Largest image decoded (pixel count from the header, before decoding): 8192², below PIL's own bomb warning.
MAX_IMAGE_PIXELS = 8192 * 8192
#: Largest JSON member parsed (``.segmentation``, ``.local_caption``...).
MAX_JSON_BYTES = 32 * 2**20
#: Largest caption member (tokenizers keep 77 tokens; a megabyte of caption is not a caption).
MAX_TEXT_BYTES = 2**20
#: Largest pax / GNU long-name header tarfile would read into memory before handing out the member.
_MAX_TAR_HEADER_BYTES = 2**20

T = TypeVar("T")


class MalformedSample(ValueError):
    """A sample that cannot be used (missing member, undecodable image, bad RLE...). Readers skip and count it."""


class DamagedShard(tarfile.ReadError):
    """A shard that is truncated or corrupt at ``key`` (the damaged sample, None when the damage is between
    samples); every sample before it has been yielded."""

    def __init__(self, shard: str, key: str | None, reason: str) -> None:
        super().__init__(f"shard is truncated or corrupt{f' inside sample {key!r}' if key else ''}: {reason}")
        self.shard, self.key = shard, key


@dataclass
class ShardSample:
    """One sample of a shard: its key and its members in tar order as (member name, bytes, tar header).

    ``oversized`` names members whose header claims more than :data:`MAX_MEMBER_BYTES`: they were never read, and
    :meth:`by_ext` refuses the sample.
    """

    key: str
    members: list[tuple[str, bytes, tarfile.TarInfo]]
    oversized: list[str] = field(default_factory=list)

    def by_ext(self) -> dict[str, bytes]:
        """Members by lower-cased extension (``image``, ``caption``, ``segmentation``...), as webdataset names them."""
        if self.oversized:
            raise MalformedSample(f"member {self.oversized[0]!r} is over the {MAX_MEMBER_BYTES}-byte member limit; "
                                  "it was not read")
        return {member_ext(name).lower(): payload for name, payload, _ in self.members}


class SampleGuard:
    """The per-sample guard of every shard reader: any failure to decode or validate one sample is caught, logged
    once (shard + key + reason; the first ``log_limit`` at WARNING, later ones at DEBUG), counted by reason type
    and skipped.

    Why catch every ``Exception``: a reader that lists the errors it expects dies on the one it did not
    (``RecursionError``, ``OverflowError``, PIL's ``DecompressionBombError`` ended training runs that way), and a
    resume that restores the data position dies on it again. Costs are bounded before they are spent (see the
    module docstring), so what is caught here is a refusal, not an exhausted machine.
    """

    def __init__(self, log_limit: int = 20) -> None:
        self.counts: Counter[str] = Counter()
        self.log_limit = log_limit
        self._logged: set[tuple[str, str]] = set()

    def run(self, shard: str, key: str, decode: Callable[[], T]) -> T | None:
        """``decode()``, or None after counting and logging its failure."""
        try:
            return decode()
        except Exception as error:  # noqa: BLE001 - one bad sample must only cost that sample (class docstring)
            self.skip(shard, key, error)
            return None

    def skip(self, shard: str, key: str, error: BaseException) -> None:
        """Count and log one skipped sample (or damaged shard)."""
        self.counts[type(error).__name__] += 1
        if (shard, key) in self._logged:
            return
        self._logged.add((shard, key))
        total = sum(self.counts.values())
        level = logging.WARNING if total <= self.log_limit else logging.DEBUG
        reason = str(error) or type(error).__name__
        logger.log(level, "skipping sample %r of shard %s (%s: %s); %d skipped so far", key, shard,
                   type(error).__name__, reason[:300], total)


# ----------------------------------------------------------------------------------------------------------- members
def member_ext(name: str) -> str:
    """The webdataset extension of a member name (everything after the first '.' of the file name)."""
    match = _KEY.match(name)
    return match.group(2) if match else ""


def member_text(data: bytes | str, limit: int = MAX_TEXT_BYTES) -> str:
    """A text member (UTF-8), at most ``limit`` bytes."""
    if len(data) > limit:
        raise MalformedSample(f"text member of {len(data)} bytes is over the {limit}-byte limit")
    try:
        return data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as error:
        raise MalformedSample(f"text member is not UTF-8: {error}") from None


def member_caption(data: bytes | str) -> str:
    """A caption member: text, stripped. A JSON object or list (``{"a": 1}``) is refused: it is a mis-written member,
    and training on its source text would teach the branch JSON."""
    text = member_text(data).strip()
    if text[:1] in ("{", "["):
        try:
            value = _load_json(text, "caption")
        except MalformedSample:
            return text
        if isinstance(value, (dict, list)):
            raise MalformedSample(f"caption is a JSON {type(value).__name__}, not text: {text[:60]!r}")
    return text


def member_int(data: bytes | str | None) -> int | None:
    """A ``.height`` / ``.width`` member as an int; None when absent or not a decimal integer of at most 9 digits."""
    if data is None:
        return None
    try:
        text = member_text(data, 64).strip()
    except MalformedSample:
        return None
    return int(text) if re.fullmatch(r"[0-9]{1,9}", text) else None


def image_header(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) of image bytes read from the header only; refuses images over
    :data:`MAX_IMAGE_PIXELS` before anything is decoded."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height, fmt = image.width, image.height, image.format or ""
    except Image.DecompressionBombError as error:  # PIL's own header check (above twice its warning size)
        raise MalformedSample(f"image is over the {MAX_IMAGE_PIXELS}-pixel limit, checked before decoding "
                              f"({error})") from None
    except Exception as error:  # noqa: BLE001 - PIL raises many types (incl. DecompressionBombError) on bad bytes
        raise MalformedSample(f"image cannot be decoded: {type(error).__name__}: {error}") from None
    if width < 1 or height < 1 or width * height > MAX_IMAGE_PIXELS:
        raise MalformedSample(f"image header claims {width}x{height} pixels; it is over the {MAX_IMAGE_PIXELS}-pixel "
                              "limit, checked before decoding")
    return fmt, width, height


def decode_image(data: bytes, mode: str = "RGB") -> np.ndarray:
    """Image bytes (jpg/png/webp...) → (H, W, 3) uint8 RGB (or (H, W) for ``mode="L"``); the pixel count is checked
    from the header before decoding (:func:`image_header`)."""
    from PIL import Image

    image_header(data)
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert(mode))
    except Exception as error:  # noqa: BLE001 - truncated data, bad chunks... (PIL's types vary by codec)
        raise MalformedSample(f"image cannot be decoded: {type(error).__name__}: {error}") from None


def _load_json(payload: bytes | str, what: str) -> Any:
    """Parse a JSON member: size capped before parsing, nesting past the parser's recursion limit refused."""
    text = member_text(payload, MAX_JSON_BYTES)
    try:
        return json.loads(text)
    except RecursionError:
        raise MalformedSample(f"{what} JSON is nested too deeply") from None
    except ValueError as error:
        raise MalformedSample(f"{what} is not JSON: {error}") from None


# ------------------------------------------------------------------------------------------------------ segmentation
def rle_decode(rle: Sequence[int] | str, height: int, width: int) -> np.ndarray:
    """Decode BrushData's RLE into an (height, width) uint8 {0, 1} mask.

    Format: flat 1-based (start, length) pairs over the image flattened in **column-major** (Fortran) order, as a
    list of ints or a whitespace-separated string. Why strict checks: a wrong height/width or a truncated RLE would
    otherwise silently produce a shifted mask that trains the branch on the wrong region.
    """
    total = height * width
    if height < 1 or width < 1 or total > MAX_IMAGE_PIXELS:
        raise MalformedSample(f"mask size {height}x{width} is outside 1..{MAX_IMAGE_PIXELS} pixels")
    if isinstance(rle, str):
        if len(rle) > MAX_JSON_BYTES or not re.fullmatch(r"[\s0-9]*", rle):
            raise MalformedSample(f"RLE string must be whitespace-separated decimal integers: {rle[:60]!r}")
        items: list[Any] = rle.split()
    elif isinstance(rle, (list, tuple)):
        items = list(rle)
    else:
        raise MalformedSample(f"RLE must be a list of integers or a string, got {type(rle).__name__}")
    if len(items) > 2 * total + 2:
        raise MalformedSample(f"RLE has {len(items)} values, more than a {height}x{width} image can have")
    if not isinstance(rle, str) and not all(type(v) is int for v in items):  # bool is an int subclass: refused
        bad = next(v for v in items if type(v) is not int)
        raise MalformedSample(f"RLE values must be integers, got {type(bad).__name__} {str(bad)[:40]!r}")
    if any(len(v) > 18 for v in items) if isinstance(rle, str) else any(not 0 <= v <= total for v in items):
        raise MalformedSample(f"RLE values must be in [0, {total}] for a {height}x{width} image")
    values = np.asarray([int(v) for v in items], dtype=np.int64)
    if values.size % 2:
        raise MalformedSample(f"RLE has an odd number of values ({values.size}); it must be (start, length) pairs")
    starts, lengths = values[0::2] - 1, values[1::2]
    if values.size and (starts.min() < 0 or lengths.min() < 0 or (starts + lengths).max() > total):
        raise MalformedSample(f"RLE runs leave the {height}x{width} image (starts are 1-based, ends ≤ {total})")
    edges = np.zeros(total + 1, dtype=np.int32)  # +1 where a run starts, -1 where it ends: linear, overlaps allowed
    np.add.at(edges, starts, 1)
    np.add.at(edges, starts + lengths, -1)
    flat = (np.cumsum(edges[:total], dtype=np.int32) > 0).astype(np.uint8)
    return flat.reshape((height, width), order="F")


def segmentation_rles(payload: bytes | str) -> list[Any]:
    """The RLE of every object of a ``.segmentation`` member, undecoded (the trainer decodes only the one it picks)."""
    data = _load_json(payload, "segmentation")
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
    text = member_text(payload, MAX_JSON_BYTES).strip()
    if text.startswith("["):
        values = _load_json(text, "local_caption")
        if not isinstance(values, list):
            raise MalformedSample("local_caption starting with '[' must be a JSON list")
        if len(values) != count or not all(v is None or isinstance(v, str) for v in values):
            raise MalformedSample(f"local_caption list has {len(values)} entries for {count} masks "
                                  "(must be aligned strings/null)")
        return [v.strip() if isinstance(v, str) and v.strip() else None for v in values]
    if count:
        captions[0] = member_caption(text) or None
    return captions


def first_object_only(payload: bytes | str | None) -> bool:
    """True for a plain-text ``.local_caption`` (older data): it describes the first object, which must be chosen."""
    return payload is not None and not member_text(payload, MAX_JSON_BYTES).strip().startswith("[")


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


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads pax and GNU long-name headers whole into memory before handing out a member; refuse huge ones."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        special = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                   tarfile.SOLARIS_XHDTYPE)
        if self.type in special and self.size > _MAX_TAR_HEADER_BYTES:
            raise tarfile.ReadError(f"extended tar header of {self.size} bytes is over the "
                                    f"{_MAX_TAR_HEADER_BYTES}-byte limit")
        return super()._proc_member(tarfile_)  # type: ignore[misc]


_STREAM_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError, MemoryError)


def iter_shard(url: str | Path) -> Iterator[ShardSample]:
    """The samples of one shard in tar order (streamed: ``pipe:`` URLs and huge shards are never seeked).

    Members without an extension are skipped with a warning; a member over :data:`MAX_MEMBER_BYTES` is not read
    (its sample's :meth:`ShardSample.by_ext` refuses). A sample is yielded as soon as the next key's header is read,
    before that member's bytes, so a cut inside sample N never costs sample N-1; the damage raises
    :class:`DamagedShard` naming sample N (a ``tarfile.TarError``: callers that skip bad shards catch it). Payloads
    are read, never decoded: the caller decides what to decode.
    """
    handle, process = _open(str(url))
    sample: ShardSample | None = None
    try:
        try:
            archive = tarfile.open(fileobj=handle, mode="r|*", tarinfo=_BoundedTarInfo)
        except _STREAM_ERRORS as error:
            raise DamagedShard(str(url), None, f"{type(error).__name__}: {error}") from None
        with archive:
            while True:
                try:
                    info = archive.next()
                except _STREAM_ERRORS as error:
                    raise DamagedShard(str(url), sample.key if sample else None,
                                       f"{type(error).__name__}: {error}") from None
                if info is None:
                    break
                archive.members.clear()  # tarfile keeps every header of a stream; a shard may hold millions
                if not info.isfile():
                    continue
                match = _KEY.match(info.name)
                if match is None:
                    logger.warning("%s: member %r has no extension; skipped", url, info.name[:200])
                    continue
                if sample is not None and match.group(1) != sample.key:
                    yield sample
                    sample = None
                if sample is None:
                    sample = ShardSample(match.group(1), [])
                if info.size > MAX_MEMBER_BYTES:
                    sample.oversized.append(info.name)
                    continue
                try:
                    extracted = archive.extractfile(info)
                    payload = extracted.read() if extracted is not None else b""
                except _STREAM_ERRORS as error:
                    raise DamagedShard(str(url), sample.key, f"{type(error).__name__}: {error}") from None
                sample.members.append((info.name, payload, info))
            if sample is not None:
                yield sample
    finally:
        handle.close()
        if process is not None:
            if process.poll() is None:  # the reader stopped early: the command must not block on a full pipe
                process.terminate()
            process.wait()
