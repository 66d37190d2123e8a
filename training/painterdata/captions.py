"""PainterData local captions (paper §3.4, supplement §6.1): a caption per segmentation object of BrushData shards.

Pipeline per object: crop the object's bounding box (padded to a square, the same view the local CLIP metric scores)
→ an image-to-text :class:`Captioner` (the paper used ShareGPT4V) → optionally a text :class:`Shortener` that keeps
the main object (the paper used ChatGLM) → a CLIP filter that keeps the caption only if the cosine similarity of the
crop and the caption is >= 0.2 (the paper's threshold).

Output: new webdataset shards with every input member copied byte for byte plus

* ``<key>.local_caption`` — JSON list aligned with the segmentation masks: the kept caption, or ``null`` for an
  empty mask, an empty caption or a caption the CLIP filter rejected;
* ``<key>.local_caption_meta`` — JSON list, same alignment: ``{"caption", "short", "clip"}`` for every non-empty
  mask (so the threshold can be changed later without captioning again), ``null`` for empty masks.

Resumable: an output shard is written to a hidden temp file and renamed into place when complete, so an existing
output shard is complete and is skipped on the next run; stale temp files are removed.

Bad input costs only itself (the shared ``SampleGuard`` of ``training.painterdata.shards``): a sample whose image,
sizes or segmentation cannot be decoded within the shard format's bounds is copied unchanged without local-caption
members, logged with shard + key + reason and counted (``malformed``); a member over the member size limit was never
read and is left out of the copy; a shard truncated or corrupt inside a sample keeps every sample before the damage,
drops the damaged one (``truncated``) and is still written, so a rerun does not stop at it again. Output shards keep
their input file names, made safe by ``training.output_names``; two inputs with one output name are refused.

Usage::

    python training/painterdata/captions.py --shards data/brushdata/ --out_dir data/painterdata/ \\
        --captioner models/blip-large --shortener models/qwen2.5-0.5b-instruct --clip models/clip-vit-large-patch14
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

if __package__ in (None, ""):  # run as `python training/painterdata/captions.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from training.output_names import OutputNames  # noqa: E402
from training.painterbench.metrics import ClipScorer, crop_mask_region  # noqa: E402
from training.painterdata.shards import (LOCAL_CAPTION, LOCAL_CAPTION_META, DamagedShard,  # noqa: E402
                                         MalformedSample, SampleGuard, ShardSample, decode_image, decode_segmentation,
                                         iter_shard, list_shards, local_caption_members, member_ext, member_int)

logger = logging.getLogger("painternet.training")

__all__ = [
    "PAPER_CLIP_THRESHOLD",
    "Captioner",
    "Shortener",
    "TransformersCaptioner",
    "TransformersShortener",
    "ClipCaptionFilter",
    "ShardStats",
    "caption_objects",
    "process_shard",
    "process_shards",
    "build_parser",
    "main",
]

#: Supplement §6.1: "retain the prompt if the similarity exceeds a threshold of 0.2" (raw cosine, not ×100).
PAPER_CLIP_THRESHOLD: float = 0.2


@runtime_checkable
class Captioner(Protocol):
    """Image → free-text description of the (cropped) object."""

    def caption(self, image: Image.Image) -> str: ...


@runtime_checkable
class Shortener(Protocol):
    """Long caption → short, object-centred caption (e.g. "a red vintage car")."""

    def shorten(self, caption: str) -> str: ...


def _load_first(loaders: Sequence[Any], path: str, **kwargs: Any) -> Any:
    errors = []
    for loader in loaders:
        try:
            return loader.from_pretrained(path, **kwargs)
        except (ValueError, KeyError, OSError) as error:
            errors.append(f"{loader.__name__}: {error}")
    raise ValueError(f"could not load {path!r} with any of " + "; ".join(errors))


def _local_model(path: str | Path, flag: str) -> str:
    local = Path(path).expanduser()
    if not local.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is not a folder; pass a local model folder saved with "
                         "save_pretrained() (models are never downloaded)")
    return str(local)


class TransformersCaptioner:
    """Any transformers vision-language model from a local folder: ``AutoProcessor`` + the first of
    ``AutoModelForImageTextToText`` (BLIP, BLIP-2, LLaVA, Qwen2-VL...), ``AutoModelForVision2Seq`` (its deprecated
    alias on older transformers) and ``AutoModelForCausalLM`` (GIT-style) that accepts the config.

    ``prompt`` conditions the generation: for processors with a chat template (LLaVA-style) it becomes a user turn
    with the image; otherwise it is passed as the text prefix (BLIP: "a picture of") and stripped from the answer.
    Greedy decoding, so captions are reproducible.
    """

    def __init__(self, path: str | Path, device: str = "cpu", prompt: str | None = None, max_new_tokens: int = 40):
        import torch
        import transformers

        local = _local_model(path, "--captioner")
        loaders = [getattr(transformers, name) for name in
                   ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM")
                   if hasattr(transformers, name)]
        self.torch = torch
        self.device = torch.device(device)
        self.model = _load_first(loaders, local).to(self.device).eval()
        self.processor = transformers.AutoProcessor.from_pretrained(local)
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens

    def caption(self, image: Image.Image) -> str:
        image = image.convert("RGB")
        text = self.prompt
        chat = bool(text) and getattr(self.processor, "chat_template", None)
        if chat:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self.processor(images=image, text=text, return_tensors="pt") if text else \
            self.processor(images=image, return_tensors="pt")
        inputs = inputs.to(self.device)
        with self.torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        prompt_ids = inputs.get("input_ids")
        if prompt_ids is not None and output.shape[1] >= prompt_ids.shape[1] and \
                self.torch.equal(output[0, :prompt_ids.shape[1]].cpu(), prompt_ids[0].cpu()):
            output = output[:, prompt_ids.shape[1]:]  # decoder-only models echo the prompt tokens
        decoded = self.processor.batch_decode(output, skip_special_tokens=True)[0].strip()
        if self.prompt and not chat and decoded.lower().startswith(self.prompt.lower()):
            decoded = decoded[len(self.prompt):].strip()
        return " ".join(decoded.split())


DEFAULT_SHORTEN_INSTRUCTION = ("Rewrite this image description as one short phrase that names only the main object "
                               "and its key attributes, e.g. 'a red vintage car'.\nDescription: {caption}\nPhrase:")


class TransformersShortener:
    """A causal language model from a local folder that shortens captions (the paper's ChatGLM step).

    With a chat template the instruction is a user turn; otherwise it is a plain completion prompt. Greedy decoding;
    the answer's first line, stripped of quotes and a trailing '.', is the short caption. An empty answer keeps the
    original caption, so a weak shortener never deletes a caption the CLIP filter could still accept.
    """

    def __init__(self, path: str | Path, device: str = "cpu", instruction: str = DEFAULT_SHORTEN_INSTRUCTION,
                 max_new_tokens: int = 24):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if "{caption}" not in instruction:
            raise ValueError(f"shortener instruction {instruction!r} lacks the {{caption}} placeholder")
        local = _local_model(path, "--shortener")
        self.torch = torch
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(local)
        self.model = AutoModelForCausalLM.from_pretrained(local).to(self.device).eval()
        self.instruction = instruction
        self.max_new_tokens = max_new_tokens

    def shorten(self, caption: str) -> str:
        request = self.instruction.format(caption=caption)
        if getattr(self.tokenizer, "chat_template", None):
            request = self.tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                                         add_generation_prompt=True)
        inputs = self.tokenizer(request, return_tensors="pt").to(self.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with self.torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                         pad_token_id=pad)
        answer = self.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        lines = [line for line in answer.strip().splitlines() if line.strip()]
        short = lines[0].strip().strip("\"'").rstrip(".").strip() if lines else ""
        return " ".join(short.split()) or caption


@dataclass
class ClipCaptionFilter:
    """Keeps a caption iff cosine(CLIP(crop), CLIP(caption)) >= ``threshold`` (0.2 in the paper, supplement §6.1)."""

    clip: ClipScorer
    threshold: float = PAPER_CLIP_THRESHOLD

    def __post_init__(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"CLIP threshold {self.threshold} is a raw cosine and must be in [-1, 1] "
                             "(the paper uses 0.2, not 20)")

    def scores(self, crops: Sequence[Image.Image], captions: Sequence[str]) -> list[float]:
        return [float(value) for value in self.clip.cosine(crops, captions)]

    def keep(self, score: float) -> bool:
        return score >= self.threshold


@dataclass
class ShardStats:
    """What one shard produced (``skipped`` = the output already existed)."""

    shard: str
    samples: int = 0
    objects: int = 0
    kept: int = 0
    malformed: int = 0
    skipped: bool = False
    truncated: bool = False
    rejected: list[float] = field(default_factory=list)


def caption_objects(image: Image.Image, masks: Sequence[np.ndarray], captioner: Captioner,
                    shortener: Shortener | None, clip_filter: ClipCaptionFilter | None
                    ) -> tuple[list[str | None], list[dict[str, Any] | None]]:
    """Local captions of one image's objects: (kept caption or None per mask, meta per mask).

    Without ``clip_filter`` every non-empty caption is kept and ``clip`` is None in the meta.
    """
    crops: list[Image.Image] = []
    raws: list[str] = []
    shorts: list[str] = []
    slots: list[int] = []
    for index, mask in enumerate(masks):
        if not (np.asarray(mask) >= 0.5).any():
            continue
        crop = crop_mask_region(image, mask)
        raw = captioner.caption(crop).strip()
        short = shortener.shorten(raw).strip() if shortener is not None and raw else raw
        crops.append(crop)
        raws.append(raw)
        shorts.append(short)
        slots.append(index)
    captions: list[str | None] = [None] * len(masks)
    meta: list[dict[str, Any] | None] = [None] * len(masks)
    scored = [n for n, short in enumerate(shorts) if short]
    scores: list[float | None] = [None] * len(shorts)
    if clip_filter is not None and scored:
        for n, score in zip(scored, clip_filter.scores([crops[n] for n in scored], [shorts[n] for n in scored])):
            scores[n] = score
    for n, index in enumerate(slots):
        meta[index] = {"caption": raws[n], "short": shorts[n], "clip": scores[n]}
        keep = bool(shorts[n]) and (clip_filter is None or clip_filter.keep(scores[n]))  # type: ignore[arg-type]
        captions[index] = shorts[n] if keep else None
    return captions, meta


def _add_member(archive: tarfile.TarFile, name: str, payload: bytes, like: tarfile.TarInfo | None) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = like.mtime if like is not None else 0
    info.mode = like.mode if like is not None else 0o644
    archive.addfile(info, io.BytesIO(payload))


def process_shard(source: str | Path, out_dir: str | Path, captioner: Captioner, shortener: Shortener | None = None,
                  clip_filter: ClipCaptionFilter | None = None, names: OutputNames | None = None) -> ShardStats:
    """Caption one shard into ``out_dir/<same name>``; skipped when that file already exists (it is complete: it
    only appears through an atomic rename). Malformed samples (no image, bad segmentation) are copied unchanged
    without local-caption members and counted; see the module docstring for truncated shards. ``names``: the
    output folder's names when several shards are processed (two inputs with one output name are refused)."""
    source = Path(source)
    names = names if names is not None else OutputNames(out_dir)
    target = names.path(source.name, owner=str(source.resolve()))
    stats = ShardStats(shard=source.name)
    guard = SampleGuard()
    if target.exists():
        stats.skipped = True
        logger.info("%s already done; skipped", target)
        return stats
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        stale.unlink()
    temp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    try:
        with tarfile.open(temp, "w") as archive:
            try:
                for sample in iter_shard(source):
                    stats.samples += 1
                    decoded = guard.run(source.name, sample.key, lambda: _decode_sample(sample.by_ext()))
                    if decoded is None:
                        stats.malformed += 1
                        added: dict[str, bytes] = {}
                    else:
                        added = _caption_sample(*decoded, captioner, shortener, clip_filter, stats)
                    _copy_sample(archive, sample, added)
            except DamagedShard as error:
                guard.skip(source.name, error.key or "<shard>", error)
                stats.truncated = True
                stats.malformed += error.key is not None
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    logger.info("%s: %d samples, %d objects, %d captions kept, %d malformed%s", source.name, stats.samples,
                stats.objects, stats.kept, stats.malformed, " (truncated: the rest of the shard is unreadable)"
                if stats.truncated else "")
    return stats


def _copy_sample(archive: tarfile.TarFile, sample: ShardSample, added: dict[str, bytes]) -> None:
    for name, payload, info in sample.members:
        if member_ext(name) in (LOCAL_CAPTION, LOCAL_CAPTION_META) and added:
            continue  # replaced by the fresh captions
        _add_member(archive, name, payload, info)
    for ext, payload in added.items():
        _add_member(archive, f"{sample.key}.{ext}", payload, sample.members[0][2])


def _decode_sample(by_ext: dict[str, bytes]) -> tuple[Image.Image, list[np.ndarray]]:
    """The image and its object masks, within the shard format's bounds (raises on anything else)."""
    if "image" not in by_ext or "segmentation" not in by_ext:
        raise MalformedSample("sample lacks .image or .segmentation")
    image = Image.fromarray(decode_image(by_ext["image"]))
    height = member_int(by_ext.get("height")) or image.height
    width = member_int(by_ext.get("width")) or image.width
    if (height, width) != (image.height, image.width):
        raise MalformedSample(f".height/.width {height}x{width} differ from the image's {image.height}x{image.width}")
    return image, decode_segmentation(by_ext["segmentation"], height, width)


def _caption_sample(image: Image.Image, masks: list[np.ndarray], captioner: Captioner, shortener: Shortener | None,
                    clip_filter: ClipCaptionFilter | None, stats: ShardStats) -> dict[str, bytes]:
    captions, meta = caption_objects(image, masks, captioner, shortener, clip_filter)
    stats.objects += sum(entry is not None for entry in meta)
    stats.kept += sum(caption is not None for caption in captions)
    stats.rejected += [entry["clip"] for entry, caption in zip(meta, captions)
                       if entry is not None and caption is None and entry["clip"] is not None]
    return local_caption_members(captions, meta)


def process_shards(shards: Sequence[str | Path], out_dir: str | Path, captioner: Captioner,
                   shortener: Shortener | None = None, clip_filter: ClipCaptionFilter | None = None,
                   progress: bool = True, rank: int = 0, world_size: int = 1) -> list[ShardStats]:
    """Caption this process's shards (folders expanded to their ``*.tar``; rank r of ``world_size`` takes shards
    r, r + world_size, ...), skipping those already complete in ``out_dir``. Each output shard depends only on its
    input shard, so the result is the same for any number of processes."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size} is invalid; need 0 <= rank < world_size")
    shard_paths = [Path(path) for path in list_shards(shards)]
    if any(Path(out_dir).resolve() == path.parent.resolve() for path in shard_paths):
        raise ValueError(f"--out_dir {str(out_dir)!r} holds the input shards; write to another folder")
    names = OutputNames(out_dir)
    for path in shard_paths:  # every rank checks every name: a collision is refused before anything is written
        names.path(path.name, owner=str(path.resolve()))
    shard_paths = shard_paths[rank::world_size]
    iterator: Any = shard_paths
    if progress:
        from tqdm import tqdm

        iterator = tqdm(shard_paths, desc="caption shards", unit="shard")
    return [process_shard(path, out_dir, captioner, shortener, clip_filter, names) for path in iterator]


def build_parser() -> argparse.ArgumentParser:
    """Every flag of the caption CLI (snake_case; the 0.1 kebab-case spellings still parse, with a warning)."""
    parser = argparse.ArgumentParser(description="PainterData: local captions for BrushData segmentation objects "
                                                 "(captioner → optional shortener → CLIP filter), resumable.")
    parser.add_argument("--shards", nargs="+", required=True, help="BrushData .tar shards or folders of them")
    parser.add_argument("--out_dir", required=True, help="folder for the captioned shards (same file names)")
    parser.add_argument("--captioner", required=True, help="local vision-language model folder (image-to-text)")
    parser.add_argument("--captioner_prompt", default=None,
                        help="prompt/prefix for the captioner (chat VLMs: the question; BLIP: e.g. 'a picture of')")
    parser.add_argument("--captioner_max_new_tokens", type=int, default=40)
    parser.add_argument("--shortener", default=None, help="local causal LM folder that shortens captions (optional)")
    parser.add_argument("--shortener_instruction", default=DEFAULT_SHORTEN_INSTRUCTION,
                        help="prompt with a {caption} placeholder")
    parser.add_argument("--clip", default=None, help="local CLIPModel folder for the filter")
    parser.add_argument("--threshold", type=float, default=PAPER_CLIP_THRESHOLD, help="raw cosine (paper: 0.2)")
    parser.add_argument("--no_clip_filter", action="store_true", help="keep every caption (no --clip needed)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no_progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Caption shards; under ``accelerate launch`` / ``torchrun`` every process takes its own shards and the main
    process prints the merged summary."""
    import dataclasses

    from training.cli import gather_in_order, parse_args, process_state, rank_device

    parser = build_parser()
    args = parse_args(parser, argv)
    state = process_state()
    args.device = rank_device(args.device, state)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if not args.clip and not args.no_clip_filter:
        parser.error("the CLIP filter needs --clip (a local CLIPModel folder); pass --no_clip_filter to keep all")
    try:
        captioner = TransformersCaptioner(args.captioner, args.device, args.captioner_prompt,
                                          args.captioner_max_new_tokens)
        shortener = (TransformersShortener(args.shortener, args.device, args.shortener_instruction)
                     if args.shortener else None)
        clip_filter = None if args.no_clip_filter else ClipCaptionFilter(ClipScorer(args.clip, args.device),
                                                                         args.threshold)
        mine = process_shards(args.shards, args.out_dir, captioner, shortener, clip_filter,
                              progress=not args.no_progress and state.is_local_main_process,
                              rank=state.process_index, world_size=state.num_processes)
    except ValueError as error:
        parser.error(str(error))
    order = {Path(path).name: n for n, path in enumerate(list_shards(args.shards))}
    merged = gather_in_order([dataclasses.asdict(s) for s in mine], state, key=lambda s: order[s["shard"]])
    logger.info("rank %d/%d captioned %d shards", state.process_index, state.num_processes, len(mine))
    if not state.is_main_process:
        return 0
    stats = [ShardStats(**entry) for entry in merged]
    done = [s for s in stats if not s.skipped]
    print(f"{len(done)} shards captioned, {len(stats) - len(done)} already complete; "
          f"{sum(s.kept for s in done)}/{sum(s.objects for s in done)} object captions kept, "
          f"{sum(s.malformed for s in done)} malformed samples")
    return 0


if __name__ == "__main__":
    from training.cli import end_processes

    raise SystemExit(end_processes(main()))
