"""Training data for PainterNet: BrushData webdataset shards, a plain folder format and a synthetic set (DESIGN §7).

Every source yields the same sample dict, built by :func:`prepare_sample` from (image, one object's segmentation,
prompt):

* ``pixel_values`` float32 (3, H, W) in [-1, 1]; ``mask`` float32 (1, H, W) in {0, 1}, **1 = hole** (DESIGN §2),
  drawn from the object's segmentation by ``painternet_core.masks`` (``paper_mix`` by default, paper Eq. 6);
* ``prompt``: the object's local caption (paper §3.2 trains on local prompts; see :class:`BrushDataShards` for
  objects without one); ``caption``: the global caption; ``atal``: False when the prompt is a scene caption used as
  a fallback, which excludes the sample from ATAL. Prompt dropout is the training loop's job (it zeroes SDXL
  embeddings);
* SDXL micro-conditioning from the *real* crop: ``original_size`` (H, W of the decoded image),
  ``crops_coords_top_left`` (top, left of the crop in the resized image, as diffusers' SDXL scripts define it) and
  ``target_size``.

:func:`collate_samples` stacks tensors and keeps texts as lists: text is tokenized and encoded in the loop, where the
frozen text encoders live on the accelerator.

All datasets are ``IterableDataset``s that split their input per distributed rank *and* per DataLoader worker
themselves (rank / world size are arguments; the worker comes from ``get_worker_info``), so they must not go through
``accelerator.prepare``. Randomness is explicit: every sample's crop and mask come from a generator seeded by
(seed, epoch, sample key), so a sample is the same whatever the number of ranks and workers; only the shuffle order
depends on the slot.
"""
from __future__ import annotations

import logging
import math
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from painternet_core.masks import MASK_MODES, generate_mask, paper_mix_mask
from training.painterdata.shards import (MAX_MEMBER_BYTES, MalformedSample, SampleGuard, ShardSample, decode_image,
                                         first_object_only, iter_shard, list_shards, local_captions, member_caption,
                                         member_int, rle_decode, segmentation_rles)

logger = logging.getLogger("painternet.training")

__all__ = [
    "IMAGE_EXTENSIONS",
    "CAPTION_FALLBACKS",
    "NoLocalCaption",
    "prepare_sample",
    "collate_samples",
    "slot_info",
    "BrushDataShards",
    "FolderDataset",
    "SyntheticShapes",
    "SyntheticScene",
    "synthetic_scene",
    "SYNTHETIC_COLORS",
    "SYNTHETIC_SHAPES",
    "draw_shape",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: What a BrushData sample whose chosen object has no kept local caption does (see :class:`BrushDataShards`).
CAPTION_FALLBACKS: tuple[str, ...] = ("skip", "global")
Resolution = int | tuple[int, int]


class NoLocalCaption(MalformedSample):
    """A BrushData sample none of whose objects has a kept local caption (skipped with ``caption_fallback='skip'``)."""


# --------------------------------------------------------------------------------------------------------- pipeline
def _pair(resolution: Resolution) -> tuple[int, int]:
    height, width = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if height < 8 or width < 8 or height % 8 or width % 8:
        raise ValueError(f"resolution {resolution!r} must be multiples of 8 (the VAE downsamples by 8), at least 8; "
                         "use e.g. 512 or (768, 1024).")
    return int(height), int(width)


def prepare_sample(image: np.ndarray, segmentation: np.ndarray, prompt: str, caption: str,
                   rng: np.random.Generator, resolution: Resolution, *, mask_mode: str = "paper_mix",
                   key: str = "") -> dict[str, Any]:
    """Resize (short side to fit), randomly crop to ``resolution``, then draw the training mask from the crop.

    Why this order: the crop is chosen so that it contains a random pixel of the object (the hole can never be
    cropped away, and large objects are seen from different parts), and the mask generator then runs at training
    resolution, where its size parameters (fractions of the short side) mean the same for every source image.
    ``image`` (H, W, 3) uint8 RGB, ``segmentation`` (H, W) non-zero = object. See the module docstring for outputs.
    """
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode {mask_mode!r} is not one of {', '.join(MASK_MODES)}.")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise MalformedSample(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if segmentation.shape != image.shape[:2]:
        raise MalformedSample(f"segmentation {segmentation.shape} does not match image {image.shape[:2]}")
    target_h, target_w = _pair(resolution)
    orig_h, orig_w = image.shape[:2]
    ys, xs = np.nonzero(segmentation)
    if ys.size == 0:
        raise MalformedSample("the object's segmentation is empty")
    scale = max(target_h / orig_h, target_w / orig_w)
    new_h, new_w = max(target_h, round(orig_h * scale)), max(target_w, round(orig_w * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    seg = cv2.resize((segmentation != 0).astype(np.uint8), (new_w, new_h), interpolation=cv2.INTER_NEAREST)
    resized_ys, resized_xs = np.nonzero(seg)
    if resized_ys.size:
        pick = int(rng.integers(resized_ys.size))
        py, px = int(resized_ys[pick]), int(resized_xs[pick])
    else:  # an object thinner than the downscale vanished: keep one of its pixels so the hole is never empty
        pick = int(rng.integers(ys.size))
        py, px = min(int(ys[pick] * scale), new_h - 1), min(int(xs[pick] * scale), new_w - 1)
        seg[py, px] = 1
    top = int(rng.integers(max(0, py - target_h + 1), min(new_h - target_h, py) + 1))
    left = int(rng.integers(max(0, px - target_w + 1), min(new_w - target_w, px) + 1))
    crop = resized[top:top + target_h, left:left + target_w]
    seg_crop = seg[top:top + target_h, left:left + target_w]
    if mask_mode == "paper_mix":
        mask, kind = paper_mix_mask(seg_crop, rng)
    else:
        mask, kind = generate_mask(seg_crop, mask_mode, rng), mask_mode
    pixels = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float() / 127.5 - 1.0
    return {
        "pixel_values": pixels,
        "mask": torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None],
        "prompt": prompt,
        "caption": caption,
        "original_size": (orig_h, orig_w),
        "crops_coords_top_left": (top, left),
        "target_size": (target_h, target_w),
        "mask_kind": kind,
        "key": key,
        "atal": True,
    }


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of :func:`prepare_sample` dicts; texts stay lists of str (tokenized in the loop, not here).

    Sizes become (B, 2) long tensors; ``training.inference.sdxl_time_ids`` turns them into SDXL's ``time_ids``.
    """
    if not samples:
        raise ValueError("collate_samples got an empty batch; check that the dataset yields samples.")
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "mask": torch.stack([s["mask"] for s in samples]),
        "prompt": [s["prompt"] for s in samples],
        "caption": [s["caption"] for s in samples],
        "original_size": torch.tensor([s["original_size"] for s in samples], dtype=torch.long),
        "crops_coords_top_left": torch.tensor([s["crops_coords_top_left"] for s in samples], dtype=torch.long),
        "target_size": torch.tensor([s["target_size"] for s in samples], dtype=torch.long),
        "mask_kind": [s["mask_kind"] for s in samples],
        "key": [s["key"] for s in samples],
        "atal": torch.tensor([bool(s.get("atal", True)) for s in samples], dtype=torch.bool),
        "position": [s.get("position") for s in samples],
    }


# --------------------------------------------------------------------------------------------------------- sharding
def slot_info(rank: int, world_size: int) -> tuple[int, int]:
    """(slot, number of slots) of the calling process: slot = rank · workers + worker id.

    Why both levels: DDP ranks each run their own DataLoader workers; splitting only by rank would make every worker
    of a rank yield the same samples, splitting only by worker would repeat them on every rank.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size} is invalid; need 0 <= rank < world_size "
                         "(accelerator.process_index, accelerator.num_processes).")
    info = get_worker_info()
    workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
    return rank * workers + worker, world_size * workers


def _sample_seed(seed: int, epoch: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode("utf-8"))])


class _SlotStream(IterableDataset):
    """Shared machinery: epochs, per-slot split, shuffle buffer, per-sample generators, skip counting."""

    def __init__(self, resolution: Resolution, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 mask_mode: str = "paper_mix", shuffle: bool = True, shuffle_buffer: int = 256,
                 repeat: bool = False) -> None:
        super().__init__()
        self.resolution = _pair(resolution)
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode {mask_mode!r} is not one of {', '.join(MASK_MODES)}.")
        slot_info(rank, world_size)  # validate early, in the main process
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.mask_mode, self.shuffle, self.shuffle_buffer, self.repeat = mask_mode, shuffle, shuffle_buffer, repeat
        #: The per-sample guard (``training.painterdata.shards.SampleGuard``): every failure of one sample is logged
        #: once with shard + key + reason, counted and skipped. Each DataLoader worker keeps its own counts; they
        #: travel with every sample's ``position`` (so they reach the checkpoint's data state and the logs).
        self.guard = SampleGuard()
        self.epoch = 0

    @property
    def skipped(self) -> Counter[str]:
        """Skipped samples by reason type, in this process (all epochs; restored by :meth:`resume`)."""
        return self.guard.counts

    def set_epoch(self, epoch: int) -> None:
        """Start from ``epoch`` (changes shuffles and per-sample draws)."""
        self.epoch = epoch

    def resume(self, positions: dict[int, dict[str, Any]], rotation: int = 0) -> None:
        """Continue each rank×worker slot right after the sample whose ``position`` is ``positions[slot]``.

        Every sample carries ``position``: its slot and the slot's stream state after it (epoch, records read from
        the epoch's input, the record numbers in the shuffle buffer, the shuffle generator's state). Resuming skips
        the records already read **without building them** (no image decode, no mask drawing) and rebuilds only the
        samples that were waiting in the shuffle buffer, so a resume at step 50k costs a buffer's worth of decodes,
        not 50k batches. ``rotation``: a DataLoader hands batch i to worker i mod W, so after B consumed batches the
        next one comes from worker B mod W; worker w of the new loader plays worker (w + rotation) mod W. Call
        before iterating (DataLoader workers copy the dataset when they start).
        """
        self.start_positions = {int(slot): dict(position) for slot, position in positions.items()}
        self.rotation = int(rotation)

    def _slot(self) -> tuple[int, int]:
        slot, slots = slot_info(self.rank, self.world_size)
        workers = slots // self.world_size
        rotation = getattr(self, "rotation", 0)
        if rotation and workers > 1:
            slot = (slot // workers) * workers + (slot % workers + rotation) % workers
        return slot, slots

    def _units(self, epoch: int, slot: int, slots: int) -> Iterator[dict[str, Any]]:
        """Raw records of this slot for one epoch (each with a ``key``); subclasses implement."""
        raise NotImplementedError

    def _build(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """Turn a raw record into a training sample (may raise MalformedSample); subclasses implement."""
        raise NotImplementedError

    def _build_or_skip(self, record: dict[str, Any], epoch: int) -> dict[str, Any] | None:
        """The sample, or None when anything about it fails (counted and logged by the guard). A record carrying
        ``error`` is a damaged stretch of input (a truncated shard): it is counted like a sample and, being a
        numbered record, is passed over without re-counting on resume."""
        def build() -> dict[str, Any]:
            if "error" in record:
                raise record["error"]
            return self._build(record, _sample_seed(self.seed, epoch, record["key"]))

        return self.guard.run(str(record.get("shard", "")), str(record.get("key", "?")), build)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, slots = self._slot()
        start = getattr(self, "start_positions", {}).get(slot)
        epoch = int(start["epoch"]) if start else self.epoch
        if start is not None:
            self.guard.counts = Counter({str(k): int(v) for k, v in start.get("skipped", {}).items()})
        while True:
            shuffle_rng = np.random.default_rng([self.seed, epoch, slot, 7919])
            buffer: list[tuple[int, dict[str, Any]]] = []  # (record number in the epoch, sample)
            built = 0
            skip_to = -1
            if start is not None:  # resume: restore the stream state without building what was consumed
                built = 1  # the resumed epoch yielded samples before the checkpoint, even if none is left to build
                skip_to = int(start["consumed"]) - 1
                pending = [int(n) for n in start["buffer"]]
                shuffle_rng.bit_generator.state = start["rng"]
                waiting: dict[int, dict[str, Any]] = {}
                start = None
            else:
                pending, waiting = [], {}
            consumed = 0
            for number, record in enumerate(self._units(epoch, slot, slots)):
                consumed = number + 1
                if number <= skip_to:
                    if number in pending:
                        sample = self._build_or_skip(record, epoch)
                        if sample is not None:
                            waiting[number] = sample
                    if number == skip_to:
                        buffer = [(n, waiting[n]) for n in pending if n in waiting]
                    continue
                sample = self._build_or_skip(record, epoch)
                if sample is None:
                    continue
                built += 1
                if not self.shuffle:
                    yield self._stamp(sample, slot, epoch, consumed, [], shuffle_rng, self.skipped)
                    continue
                buffer.append((number, sample))
                if len(buffer) >= self.shuffle_buffer:
                    _, out = buffer.pop(int(shuffle_rng.integers(len(buffer))))
                    yield self._stamp(out, slot, epoch, consumed, [n for n, _ in buffer], shuffle_rng,
                                      self.skipped)
            while buffer:
                _, out = buffer.pop(int(shuffle_rng.integers(len(buffer))))
                built += 1
                yield self._stamp(out, slot, epoch, consumed, [n for n, _ in buffer], shuffle_rng, self.skipped)
            if self.skipped:
                logger.info("epoch %d slot %d/%d: skipped %s", epoch, slot, slots, dict(self.skipped))
            if not self.repeat:
                return
            if not built:  # repeating an epoch that yields nothing would spin forever
                raise RuntimeError(
                    f"rank×worker slot {slot}/{slots} got no usable sample in epoch {epoch} (skipped so far: "
                    f"{dict(self.skipped) or 'none; it has no input'}); give every slot data (more shards or images "
                    "than ranks × workers), caption the shards with training/painterdata/captions.py, or pass "
                    "--caption_fallback global to train objects without a local caption on the scene caption")
            epoch += 1

    @staticmethod
    def _stamp(sample: dict[str, Any], slot: int, epoch: int, consumed: int, buffer: list[int],
               rng: np.random.Generator, skipped: Counter[str]) -> dict[str, Any]:
        sample["position"] = {"slot": slot, "epoch": epoch, "consumed": consumed, "buffer": buffer,
                              "rng": rng.bit_generator.state, "skipped": dict(skipped)}
        return sample


def _split(items: Sequence[Any], epoch: int, seed: int, slot: int, slots: int, shuffle: bool) -> list[Any]:
    """This slot's share of ``items``: an epoch permutation common to all slots (same seed everywhere), then every
    ``slots``-th element, so the slots partition the items exactly."""
    order = np.random.default_rng([seed, epoch]).permutation(len(items)) if shuffle else np.arange(len(items))
    return [items[i] for i in order[slot::slots]]


# --------------------------------------------------------------------------------------------------------- BrushData
class BrushDataShards(_SlotStream):
    """BrushData / PainterData webdataset shards (the format: ``training.painterdata.shards``).

    One object with a non-empty mask is chosen per sample; only that RLE is decoded. Which objects may be chosen
    depends on ``caption_fallback`` (paper §3.2 trains on *local* prompts):

    * ``"skip"`` (default): only objects with a kept local caption; a sample without one is skipped and counted
      (``skipped["NoLocalCaption"]``), never trained on its scene caption;
    * ``"global"``: any object, uniformly; an object without a local caption is trained on the global caption, and
      such a sample has ``atal=False``: ATAL on a scene caption would pull unrelated tokens into the hole.

    A plain-text ``.local_caption`` (older data) describes the first object, which is then always the one chosen.
    Shards are read by ``training.painterdata.shards.iter_shard`` (local paths, brace patterns, ``pipe:`` URLs);
    with at least as many shards as rank × worker slots, shards are split; with fewer, every slot reads all shards
    and keeps every slots-th sample (correct, more I/O; logged). A truncated or corrupt shard costs only its damaged
    sample (counted as ``DamagedShard``; the samples before it train), see ``training.painterdata.shards``.
    """

    def __init__(self, shards: str | Path | Sequence[str | Path], resolution: Resolution, *,
                 caption_fallback: str = "skip", **kwargs: Any) -> None:
        super().__init__(resolution, **kwargs)
        if caption_fallback not in CAPTION_FALLBACKS:
            raise ValueError(f"caption_fallback {caption_fallback!r} is not one of {', '.join(CAPTION_FALLBACKS)}.")
        self.shards = list_shards(shards)
        self.caption_fallback = caption_fallback

    def _units(self, epoch: int, slot: int, slots: int) -> Iterator[dict[str, Any]]:
        if len(self.shards) >= slots:
            urls, keep = _split(self.shards, epoch, self.seed, slot, slots, self.shuffle), None
        else:
            if epoch == self.epoch and slot == 0:
                logger.warning("%d shards for %d rank×worker slots: every slot reads all shards and keeps 1/%d of "
                               "the samples; write more shards for less I/O", len(self.shards), slots, slots)
            urls, keep = _split(self.shards, epoch, self.seed, 0, 1, self.shuffle), (slot, slots)
        index = 0
        for url in urls:
            try:
                for sample in iter_shard(url):
                    if keep is None or index % keep[1] == keep[0]:
                        yield {"key": sample.key, "shard": url, "sample": sample}
                    index += 1
            except (tarfile.TarError, OSError) as error:
                if keep is None or index % keep[1] == keep[0]:
                    yield {"key": getattr(error, "key", None) or "<shard>", "shard": url, "error": error}

    def _build(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        sample: ShardSample = record["sample"]
        members = sample.by_ext()
        missing = [m for m in ("image", "caption", "height", "width", "segmentation") if m not in members]
        if missing:
            raise MalformedSample(f"missing members: {', '.join('.' + m for m in missing)}")
        height, width = member_int(members["height"]), member_int(members["width"])
        if height is None or width is None:
            raise MalformedSample(f".height/.width must be decimal integers, got {members['height'][:20]!r} / "
                                  f"{members['width'][:20]!r}")
        rles = segmentation_rles(members["segmentation"])
        if not rles:
            raise MalformedSample('segmentation JSON has no non-empty "mask" list')
        caption = member_caption(members["caption"])
        local = local_captions(members.get("local_caption"), len(rles))
        if first_object_only(members.get("local_caption")):
            candidates = [0]
        else:
            candidates = [int(i) for i in rng.permutation(len(rles))]
        if self.caption_fallback == "skip":
            candidates = [i for i in candidates if local[i] is not None]
            if not candidates:
                raise NoLocalCaption("no object has a kept local caption (caption_fallback='skip')")
        image = decode_image(members["image"])
        if image.shape[:2] != (height, width):
            raise MalformedSample(f"image is {image.shape[0]}x{image.shape[1]} but .height/.width say "
                                  f"{height}x{width}")
        for index in candidates:
            seg = rle_decode(rles[index], height, width)
            if seg.any():
                text = local[index]
                sample = prepare_sample(image, seg, text or caption, caption, rng, self.resolution,
                                        mask_mode=self.mask_mode, key=record["key"])
                sample["atal"] = text is not None
                return sample
        raise MalformedSample("every object mask is empty")


# --------------------------------------------------------------------------------------------------------- folder
def _read_capped(path: Path) -> bytes:
    size = path.stat().st_size
    if size > MAX_MEMBER_BYTES:
        raise MalformedSample(f"{path.name} is {size} bytes, over the {MAX_MEMBER_BYTES}-byte limit")
    return path.read_bytes()


class FolderDataset(_SlotStream):
    """A plain folder: ``NAME.png|jpg|jpeg|webp|bmp`` image, ``NAME_mask.png`` object mask (non-zero = object; the
    training mask is drawn from it by ``mask_mode``; use ``mask_mode="segmentation"`` to train on it as drawn),
    ``NAME.txt`` local caption (the prompt) and optional ``NAME.caption.txt`` global caption (defaults to the local
    one). Subfolders are searched too. Images without a mask file are skipped and counted.

    Why this naming: it is what inpainting datasets exported from editors look like (image + mask + text side by
    side), and it needs no manifest.
    """

    def __init__(self, root: str | Path, resolution: Resolution, **kwargs: Any) -> None:
        super().__init__(resolution, **kwargs)
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"folder dataset root {self.root} is not a directory.")
        self.items = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                            and not p.stem.endswith("_mask") and p.is_file())
        if not self.items:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}; see FolderDataset's "
                             "docstring for the NAME.png + NAME_mask.png + NAME.txt layout.")

    def _units(self, epoch: int, slot: int, slots: int) -> Iterator[dict[str, Any]]:
        for path in _split(self.items, epoch, self.seed, slot, slots, self.shuffle):
            yield {"key": str(path.relative_to(self.root).with_suffix("")), "path": path, "shard": str(self.root)}

    def _build(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        path: Path = record["path"]
        mask_path = path.with_name(path.stem + "_mask.png")
        text_path = path.with_suffix(".txt")
        if not mask_path.is_file():
            raise MalformedSample(f"missing mask file {mask_path.name}")
        if not text_path.is_file():
            raise MalformedSample(f"missing caption file {text_path.name}")
        image = decode_image(_read_capped(path))
        mask = decode_image(_read_capped(mask_path), mode="L")
        if mask.shape != image.shape[:2]:
            raise MalformedSample(f"mask {mask.shape} and image {image.shape[:2]} sizes differ")
        prompt = member_caption(_read_capped(text_path))
        caption_path = path.with_name(path.stem + ".caption.txt")
        caption = member_caption(_read_capped(caption_path)) if caption_path.is_file() else prompt
        return prepare_sample(image, mask > 127, prompt, caption, rng, self.resolution, mask_mode=self.mask_mode,
                              key=record["key"])


# --------------------------------------------------------------------------------------------------------- synthetic
SYNTHETIC_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (240, 220, 40),
    "white": (245, 245, 245), "black": (15, 15, 15), "orange": (245, 140, 20), "purple": (140, 50, 180),
}
SYNTHETIC_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")


@dataclass(frozen=True)
class SyntheticScene:
    """One synthetic image, its objects as (segmentation uint8 {0,1}, local caption) and its global caption."""

    image: np.ndarray
    objects: list[tuple[np.ndarray, str]]
    caption: str


def draw_shape(canvas: np.ndarray, seg: np.ndarray, shape: str, color: tuple[int, int, int],
               center: tuple[int, int], radius: int, angle: float) -> None:
    """Draw one of :data:`SYNTHETIC_SHAPES` filled in ``color`` on ``canvas`` (anti-aliased) and as 1 on ``seg``
    (hard edges: the segmentation is the object, the canvas is what a camera would see). ``radius`` is the
    circumradius, ``angle`` the rotation in radians. Shared by the synthetic set and bench/learning_task.py."""
    cx, cy = center
    if shape == "circle":
        cv2.circle(canvas, (cx, cy), radius, color, -1, cv2.LINE_AA)
        cv2.circle(seg, (cx, cy), radius, 1, -1)
        return
    if shape == "square":
        corners = [angle + math.pi / 4 + k * math.pi / 2 for k in range(4)]
        points = [(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in corners]
    elif shape == "triangle":
        corners = [angle + k * 2 * math.pi / 3 for k in range(3)]
        points = [(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in corners]
    else:  # star: 5 outer points, inner radius 0.45
        points = [(cx + r * math.cos(angle + k * math.pi / 5), cy + r * math.sin(angle + k * math.pi / 5))
                  for k in range(10) for r in [radius if k % 2 == 0 else 0.45 * radius]]
    polygon = np.round(np.array(points)).astype(np.int32)
    cv2.fillPoly(canvas, [polygon], color, cv2.LINE_AA)
    cv2.fillPoly(seg, [polygon], 1)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def synthetic_scene(index: int, seed: int = 0, size: tuple[int, int] = (96, 128), max_objects: int = 2) -> SyntheticScene:
    """Scene ``index``: a two-colour gradient background and 1..max_objects coloured shapes, each with its own
    segmentation and local caption ("red circle"); global caption "a red circle and an orange star on a green
    background" (only words the tiny tokenizer knows). A pure function of (index, seed, size): tests and the smoke
    run can rely on exact pixels."""
    rng = np.random.default_rng([seed, index, 104729])
    height, width = size
    names = list(SYNTHETIC_COLORS)
    background = names[int(rng.integers(len(names)))]
    base = np.array(SYNTHETIC_COLORS[background], dtype=np.float32)
    ramp = np.linspace(-25.0, 25.0, width, dtype=np.float32)[None, :, None]
    canvas = np.clip(base[None, None, :] + ramp + rng.normal(0, 4, (height, width, 3)), 0, 255).astype(np.uint8)
    objects: list[tuple[np.ndarray, str]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        color = names[int(rng.integers(len(names)))]
        while color == background:
            color = names[int(rng.integers(len(names)))]
        shape = SYNTHETIC_SHAPES[int(rng.integers(len(SYNTHETIC_SHAPES)))]
        radius = int(rng.integers(max(3, min(size) // 8), max(4, min(size) // 3)))
        center = (int(rng.integers(radius, width - radius)), int(rng.integers(radius, height - radius)))
        seg = np.zeros((height, width), dtype=np.uint8)
        draw_shape(canvas, seg, shape, SYNTHETIC_COLORS[color], center, radius, float(rng.uniform(0, 2 * math.pi)))
        for earlier, _ in objects:  # later shapes occlude earlier ones
            earlier[seg != 0] = 0
        objects.append((seg, f"{color} {shape}"))
    objects = [(seg, text) for seg, text in objects if seg.any()]
    caption = " and ".join(_article(text) for _, text in objects) + f" on {_article(background)} background"
    return SyntheticScene(canvas, objects, caption)


class SyntheticShapes(_SlotStream):
    """``length`` synthetic scenes (see :func:`synthetic_scene`); sample i uses the object chosen by its own
    generator and its local caption as the prompt. Deterministic by ``seed`` (and epoch) whatever the slot layout."""

    def __init__(self, length: int, resolution: Resolution, *, image_size: tuple[int, int] = (96, 128),
                 **kwargs: Any) -> None:
        super().__init__(resolution, **kwargs)
        if length < 1:
            raise ValueError(f"length must be ≥ 1, got {length}.")
        self.length, self.image_size = length, image_size

    def __len__(self) -> int:
        return self.length

    def _units(self, epoch: int, slot: int, slots: int) -> Iterator[dict[str, Any]]:
        for index in _split(list(range(self.length)), epoch, self.seed, slot, slots, self.shuffle):
            yield {"key": f"synthetic-{index:06d}", "index": index}

    def _build(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        scene = synthetic_scene(record["index"], self.seed, self.image_size)
        seg, local = scene.objects[int(rng.integers(len(scene.objects)))]
        return prepare_sample(scene.image, seg, local, scene.caption, rng, self.resolution,
                              mask_mode=self.mask_mode, key=record["key"])
