"""Build a PainterBench-like benchmark (paper §4.1, supplement §7): images, segmentation masks and local prompts →
one mask per item of one of the three kinds (segmentation / box / irregular) in balanced proportions, deterministic
for a seed, written as ``manifest.jsonl`` + mask PNGs that ``training/painterbench/evaluate.py`` reads directly.

Why balanced instead of the training mix (Eq. 6 draws box 25 % / irregular 50 % / segmentation 25 %): a benchmark
should weigh each mask kind equally so per-kind means are comparable; the kinds are dealt round-robin (counts differ
by at most one) within each ``category`` (the paper balances humans/animals/indoor/outdoor too) and then shuffled
with the seed. Mask shapes come from ``painternet_core.masks.generate_mask`` with
``numpy.random.default_rng([seed, index])``, so item i's mask does not depend on the other items' masks.

Sources:

* ``--source manifest.jsonl|.csv`` with ``image``, ``segmentation`` (a mask PNG, non-zero = object),
  ``local_prompt`` (required) and ``id``, ``global_prompt``, ``category`` (optional); paths relative to the file;
* ``--shards`` PainterData shards (``training/painterdata/captions.py`` output): per image, one object with a kept
  local caption (chosen with the seed among objects covering at least ``--min_area`` of the image;
  id = ``<key>_<object index>``
  with "/" in the key replaced by "_"); the shard's ``.caption``
  becomes the global prompt.

Output folder: ``images/<id><ext>`` (source bytes copied; ``ext`` from the image's own format, never from the
source file name), ``segmentations/<id>.png``, ``masks/<id>.png`` (0/255, 255 = region to generate) and
``manifest.jsonl`` with ``id, image, mask, segmentation, mask_mode, local_prompt, global_prompt, category``.

Ids come from shared files, so they are hostile input: file names are made from them by ``training.output_names``
(one path component of safe characters, a hash of the original when it had to change; names that still collide are
refused), every path is checked to stay inside ``--out_dir``, and every item is validated and named before the first
file is written, so a refused source leaves nothing behind. The manifest keeps the original id.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

if __package__ in (None, ""):  # run as `python training/painterbench/manifest.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from painternet_core.masks import MASK_KINDS, generate_mask  # noqa: E402
from training.output_names import OutputNames  # noqa: E402
from training.painterdata.shards import (LOCAL_CAPTION, MAX_MEMBER_BYTES, DamagedShard,  # noqa: E402
                                         MalformedSample, SampleGuard, decode_image, decode_segmentation,
                                         image_header, iter_shard, list_shards, local_captions, member_caption)

logger = logging.getLogger("painternet.training")

__all__ = ["SourceItem", "assign_mask_modes", "read_source_manifest", "read_painterdata_shards", "build_benchmark",
           "main"]


@dataclass(frozen=True)
class SourceItem:
    """An image, the segmentation of the object to inpaint (float32 HxW {0,1}) and its prompts."""

    id: str
    image_bytes: bytes
    image_suffix: str
    segmentation: np.ndarray
    local_prompt: str
    global_prompt: str = ""
    category: str = ""


def assign_mask_modes(categories: Sequence[str], seed: int) -> list[str]:
    """One mask kind per item: within each category the kinds are dealt round-robin (counts differ by at most one,
    starting from a seed-chosen kind) and shuffled with the seed. Deterministic for (categories, seed)."""
    rng = np.random.default_rng(seed)
    modes = [""] * len(categories)
    for category in sorted(set(categories)):
        members = [i for i, c in enumerate(categories) if c == category]
        offset = int(rng.integers(len(MASK_KINDS)))
        order = rng.permutation(len(members))
        for n, position in enumerate(order):
            modes[members[int(position)]] = MASK_KINDS[(offset + n) % len(MASK_KINDS)]
    return modes


def _read_file(path: Path, where: str) -> bytes:
    size = path.stat().st_size
    if size > MAX_MEMBER_BYTES:
        raise ValueError(f"{where}: {str(path)!r} is {size} bytes, over the {MAX_MEMBER_BYTES}-byte limit")
    return path.read_bytes()


def read_source_manifest(path: str | Path) -> list[SourceItem]:
    """Read ``--source``: JSONL or CSV with image, segmentation, local_prompt (+ id, global_prompt, category)."""
    source = Path(path).expanduser()
    if not source.is_file():
        raise ValueError(f"source manifest {str(path)!r} does not exist; pass a .jsonl or .csv file")
    if source.suffix.lower() == ".csv":
        with source.open(encoding="utf-8", newline="") as handle:
            records = list(csv.DictReader(handle))
    elif source.suffix.lower() in (".jsonl", ".json"):
        records = []
        for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as error:
                raise ValueError(f"{source}:{number} is not usable JSON ({type(error).__name__}); write one object "
                                 "per line") from None
            if not isinstance(record, dict):
                raise ValueError(f"{source}:{number} is a {type(record).__name__}, not a JSON object")
            records.append(record)
    else:
        raise ValueError(f"source manifest {str(source)!r} has suffix {source.suffix!r}; use .jsonl or .csv")
    items = []
    for number, record in enumerate(records, 1):
        missing = [key for key in ("image", "segmentation", "local_prompt") if not str(record.get(key) or "").strip()]
        if missing:
            raise ValueError(f"{source} record {number} lacks {', '.join(missing)}; each record needs image, "
                             "segmentation (mask PNG) and local_prompt")
        image_path = (source.parent / record["image"]).resolve()
        seg_path = (source.parent / record["segmentation"]).resolve()
        where = f"{source} record {number}"
        for file, key in ((image_path, "image"), (seg_path, "segmentation")):
            if not file.is_file():
                raise ValueError(f"{where}: {key} {str(file)!r} does not exist")
        image_bytes = _read_file(image_path, where)
        try:
            suffix = _image_suffix(image_bytes)
            segmentation = (decode_image(_read_file(seg_path, where), mode="L") > 0).astype(np.float32)
        except MalformedSample as error:
            raise ValueError(f"{where}: {error} ({str(image_path)!r} / {str(seg_path)!r}); the image and the "
                             "segmentation must be image files") from None
        items.append(SourceItem(id=str(record.get("id") or image_path.stem), image_bytes=image_bytes,
                                image_suffix=suffix, segmentation=segmentation,
                                local_prompt=str(record["local_prompt"]),
                                global_prompt=str(record.get("global_prompt") or ""),
                                category=str(record.get("category") or "")))
    return items


def _image_suffix(payload: bytes) -> str:
    """The file suffix of image bytes, from their format (a source file named ``x.bashrc`` holding a PNG is a .png;
    one holding a shell line is refused)."""
    fmt = image_header(payload)[0]
    return {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp"}.get(fmt) or ".png"


def read_painterdata_shards(paths: Sequence[str | Path], seed: int, min_area: float = 0.0) -> Iterator[SourceItem]:
    """One item per shard sample that has an object with a kept local caption covering >= ``min_area`` of the image
    (chosen with ``default_rng([seed, sample number])`` when several qualify)."""
    number = 0
    guard = SampleGuard()
    for shard in list_shards(paths):
        name = Path(shard).name
        try:
            for sample in iter_shard(shard):
                number += 1
                item = guard.run(name, sample.key, lambda: _shard_item(sample.key, sample.by_ext(), seed, number,
                                                                      min_area))
                if item is not None:
                    yield item
        except DamagedShard as error:
            guard.skip(name, error.key or "<shard>", error)
    if guard.counts:
        logger.info("shards: skipped %s", dict(guard.counts))


def _shard_item(key: str, by_ext: dict[str, bytes], seed: int, number: int, min_area: float) -> SourceItem | None:
    """The item of one shard sample, None when it has no usable captioned object (raises when it is malformed)."""
    if not {"image", "segmentation", LOCAL_CAPTION} <= set(by_ext):
        return None
    suffix = _image_suffix(by_ext["image"])
    _, width, height = image_header(by_ext["image"])
    masks = decode_segmentation(by_ext["segmentation"], height, width)
    captions = local_captions(by_ext[LOCAL_CAPTION], len(masks))
    usable = [i for i, (mask, caption) in enumerate(zip(masks, captions))
              if caption and float(mask.mean()) >= min_area and mask.any()]
    if not usable:
        return None
    chosen = usable[int(np.random.default_rng([seed, number]).integers(len(usable)))]
    global_prompt = member_caption(by_ext["caption"]) if "caption" in by_ext else ""
    return SourceItem(id=f"{key.replace('/', '_')}_{chosen}", image_bytes=by_ext["image"], image_suffix=suffix,
                      segmentation=masks[chosen], local_prompt=str(captions[chosen]), global_prompt=global_prompt)


def _save_mask(mask: np.ndarray, path: Path) -> None:
    Image.fromarray((np.asarray(mask) >= 0.5).astype(np.uint8) * 255, mode="L").save(path)


def build_benchmark(items: Sequence[SourceItem], out_dir: str | Path, seed: int = 0) -> Path:
    """Write the benchmark folder; returns the path of ``manifest.jsonl``. Items whose mask comes out empty (an
    empty segmentation) are skipped with a warning."""
    if not items:
        raise ValueError("no source items: the source has no image with a segmentation and a local prompt")
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"source repeats id {duplicate!r}; ids name the output files and must be unique")
    out = Path(out_dir)
    names = OutputNames(out)
    files = [(names.path(item.id, item.image_suffix, "images"), names.path(item.id, ".png", "masks"),
              names.path(item.id, ".png", "segmentations")) for item in items]  # every refusal before any write
    for sub in ("images", "masks", "segmentations"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    modes = assign_mask_modes([item.category for item in items], seed)
    manifest = out / "manifest.jsonl"
    temp = out / ".manifest.jsonl.tmp"
    with temp.open("w", encoding="utf-8") as handle:
        for index, (item, mode, (image_path, mask_path, seg_path)) in enumerate(zip(items, modes, files)):
            mask = generate_mask(item.segmentation, mode, np.random.default_rng([seed, index]))
            if not (mask >= 0.5).any():
                logger.warning("item %r: empty %s mask (empty segmentation); skipped", item.id[:200], mode)
                continue
            image_path.write_bytes(item.image_bytes)
            _save_mask(mask, mask_path)
            _save_mask(item.segmentation, seg_path)
            handle.write(json.dumps({"id": item.id, "image": f"images/{image_path.name}",
                                     "mask": f"masks/{mask_path.name}",
                                     "segmentation": f"segmentations/{seg_path.name}", "mask_mode": mode,
                                     "local_prompt": item.local_prompt, "global_prompt": item.global_prompt,
                                     "category": item.category}, ensure_ascii=False) + "\n")
    shutil.move(str(temp), str(manifest))
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build a PainterBench-like benchmark folder (manifest.jsonl + "
                                                 "mask PNGs) with balanced segmentation/box/irregular masks.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--source", help="JSONL/CSV with image, segmentation, local_prompt (+ id, global_prompt, "
                                         "category)")
    source.add_argument("--shards", nargs="+",
                        help="PainterData shards (training/painterdata/captions.py output) or folders")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N source items")
    parser.add_argument("--min_area", type=float, default=0.01,
                        help="shards: smallest object area as a fraction of the image")
    from training.cli import parse_args

    args = parse_args(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit {args.limit} must be >= 1")
    try:
        if args.source:
            items = read_source_manifest(args.source)[:args.limit]
        else:
            items = []
            for item in read_painterdata_shards(args.shards, args.seed, args.min_area):
                if args.limit is not None and len(items) >= args.limit:
                    break
                items.append(item)
        manifest = build_benchmark(items, args.out_dir, args.seed)
    except ValueError as error:
        parser.error(str(error))
    print(f"wrote {manifest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
