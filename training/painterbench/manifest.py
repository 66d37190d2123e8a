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

Output folder: ``images/<id><ext>`` (source bytes copied), ``segmentations/<id>.png``, ``masks/<id>.png``
(0/255, 255 = region to generate) and ``manifest.jsonl`` with ``id, image, mask, segmentation, mask_mode,
local_prompt, global_prompt, category``.
"""
from __future__ import annotations

import argparse
import csv
import io
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
from training.painterdata.shards import (LOCAL_CAPTION, decode_segmentation, iter_shard, list_shards,  # noqa: E402
                                         local_captions)

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


def _read_mask_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return (np.asarray(image.convert("L")) > 0).astype(np.float32)


def read_source_manifest(path: str | Path) -> list[SourceItem]:
    """Read ``--source``: JSONL or CSV with image, segmentation, local_prompt (+ id, global_prompt, category)."""
    source = Path(path).expanduser()
    if not source.is_file():
        raise ValueError(f"source manifest {str(path)!r} does not exist; pass a .jsonl or .csv file")
    if source.suffix.lower() == ".csv":
        with source.open(encoding="utf-8", newline="") as handle:
            records = list(csv.DictReader(handle))
    elif source.suffix.lower() in (".jsonl", ".json"):
        records = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
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
        for file, key in ((image_path, "image"), (seg_path, "segmentation")):
            if not file.is_file():
                raise ValueError(f"{source} record {number}: {key} {str(file)!r} does not exist")
        items.append(SourceItem(id=str(record.get("id") or image_path.stem), image_bytes=image_path.read_bytes(),
                                image_suffix=image_path.suffix.lower() or ".png",
                                segmentation=_read_mask_png(seg_path), local_prompt=str(record["local_prompt"]),
                                global_prompt=str(record.get("global_prompt") or ""),
                                category=str(record.get("category") or "")))
    return items


def _image_suffix(payload: bytes) -> str:
    with Image.open(io.BytesIO(payload)) as image:
        return {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}.get(image.format or "", ".png")


def read_painterdata_shards(paths: Sequence[str | Path], seed: int, min_area: float = 0.0) -> Iterator[SourceItem]:
    """One item per shard sample that has an object with a kept local caption covering >= ``min_area`` of the image
    (chosen with ``default_rng([seed, sample number])`` when several qualify)."""
    number = 0
    for shard in list_shards(paths):
        for sample in iter_shard(shard):
            number += 1
            key = sample.key
            by_ext = sample.by_ext()
            if not {"image", "segmentation", LOCAL_CAPTION} <= set(by_ext):
                continue
            try:
                with Image.open(io.BytesIO(by_ext["image"])) as image:
                    width, height = image.size
                masks = decode_segmentation(by_ext["segmentation"], height, width)
                captions = local_captions(by_ext[LOCAL_CAPTION], len(masks))
            except (ValueError, OSError) as error:
                logger.warning("%s/%s is malformed (%s); skipped", Path(shard).name, key, error)
                continue
            usable = [i for i, (mask, caption) in enumerate(zip(masks, captions))
                      if caption and float(mask.mean()) >= min_area and mask.any()]
            if not usable:
                continue
            chosen = usable[int(np.random.default_rng([seed, number]).integers(len(usable)))]
            global_prompt = by_ext.get("caption", b"").decode("utf-8", errors="replace").strip()
            yield SourceItem(id=f"{key.replace('/', '_')}_{chosen}", image_bytes=by_ext["image"],
                             image_suffix=_image_suffix(by_ext["image"]), segmentation=masks[chosen],
                             local_prompt=str(captions[chosen]), global_prompt=global_prompt)


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
    for sub in ("images", "masks", "segmentations"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    modes = assign_mask_modes([item.category for item in items], seed)
    manifest = out / "manifest.jsonl"
    temp = out / ".manifest.jsonl.tmp"
    with temp.open("w", encoding="utf-8") as handle:
        for index, (item, mode) in enumerate(zip(items, modes)):
            mask = generate_mask(item.segmentation, mode, np.random.default_rng([seed, index]))
            if not (mask >= 0.5).any():
                logger.warning("item %s: empty %s mask (empty segmentation); skipped", item.id, mode)
                continue
            image_name = f"images/{item.id}{item.image_suffix}"
            (out / image_name).write_bytes(item.image_bytes)
            _save_mask(mask, out / f"masks/{item.id}.png")
            _save_mask(item.segmentation, out / f"segmentations/{item.id}.png")
            handle.write(json.dumps({"id": item.id, "image": image_name, "mask": f"masks/{item.id}.png",
                                     "segmentation": f"segmentations/{item.id}.png", "mask_mode": mode,
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
