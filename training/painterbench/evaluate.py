"""PainterBench-style evaluation of inpainting results (paper §4.1, DESIGN §8).

Inputs: a benchmark (a folder holding ``manifest.jsonl``/``manifest.csv`` as written by
``training/painterbench/manifest.py``, or such a manifest file) of items (id, image, mask, local prompt, global
prompt), and a :class:`Generator` that gives
the inpainted image of an item — a folder of already generated images matched by id or source file name, or a
PainterNet branch + base model run now through the reference pipeline (:class:`BranchGenerator`).

Outputs in ``--out_dir``: ``per_image.csv`` (one row per item), ``summary.csv`` and ``summary.md`` (means overall and
per mask kind). A metric whose model flag is not given is not computed and its column is absent; a metric that is
undefined for an item (e.g. PSNR when the mask covers the whole image) is an empty cell and is left out of the mean.

Usage::

    python training/painterbench/evaluate.py --manifest bench/ --generated outputs/ --out_dir eval/ \\
        --clip models/clip-vit-large-patch14 --aesthetic_head models/sac+logos+ava1-l14-linearMSE.pth \\
        --gdino models/grounding-dino-base --device cuda
    python training/painterbench/evaluate.py --manifest bench/ --branch out/painternet.safetensors --base ./sd15 \\
        --save_generated eval/generated --out_dir eval/ --clip models/clip-vit-large-patch14 --device cuda
    python training/painterbench/evaluate.py --merge eval/per_image.csv eval_ir/per_image.csv --out_dir eval_all/
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

if __package__ in (None, ""):  # run as `python training/painterbench/evaluate.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from training.output_names import OutputNames, safe_stem  # noqa: E402
from training.painterbench.metrics import (  # noqa: E402
    PSNR_CAP_DB,
    AestheticScorer,
    ClipScorer,
    GroundingDinoScorer,
    ImageRewardScorer,
    LpipsScorer,
    PromptImageScorer,
    binarize_mask,
    crop_mask_region,
    unmasked_region_metrics,
)

logger = logging.getLogger("painternet.training")

__all__ = [
    "BenchItem",
    "read_manifest",
    "Generator",
    "FolderGenerator",
    "BranchGenerator",
    "generation_size",
    "working_mask",
    "MetricSuite",
    "METRIC_COLUMNS",
    "GDINO_RULES",
    "ITEM_COLUMNS",
    "evaluate",
    "summarize",
    "write_per_image_csv",
    "read_per_image_csv",
    "write_summary",
    "merge_results",
    "main",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

#: Descriptive columns that start every per-image row.
ITEM_COLUMNS: tuple[str, ...] = ("id", "mask_mode", "mask_area", "local_prompt", "global_prompt")
#: Every metric column in output order; a run writes the subset its models and rules allow. Prompt-scored columns
#: use the local prompt (PainterBench's prompts are local, paper §4.1); ``*_global`` score the item's global prompt
#: (empty when it has none). ``gdino_crop_hit`` is the paper's Gdino rule, ``gdino_iou_hit``/``gdino_iou`` the
#: whole-image IoU rule (see ``GroundingDinoScorer``).
METRIC_COLUMNS: tuple[str, ...] = ("clip_sim", "clip_sim_global", "local_clip_sim", "aesthetic", "image_reward",
                                   "image_reward_global", "gdino_crop_hit", "gdino_iou_hit", "gdino_iou", "psnr",
                                   "mse", "lpips")
#: ``--gdino_rule`` values: the paper's crop + phrase rule, the whole-image IoU rule, or both.
GDINO_RULES: tuple[str, ...] = ("crop", "iou", "both")


@dataclass(frozen=True)
class BenchItem:
    """One benchmark item. Paths are absolute; ``mask_mode`` is the kind of mask (segmentation/box/irregular)."""

    id: str
    image_path: Path
    mask_path: Path
    local_prompt: str
    global_prompt: str = ""
    mask_mode: str = ""

    def load_image(self) -> Image.Image:
        with Image.open(self.image_path) as image:
            return image.convert("RGB")

    def load_mask(self) -> np.ndarray:
        """Float32 HxW in {0, 1}, 1 = region to generate (a grey PNG is binarised at 128)."""
        with Image.open(self.mask_path) as image:
            array = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        return binarize_mask(array).astype(np.float32)

    @property
    def clip_prompt(self) -> str:
        """The prompt a BrushNet-style generator is given: the global prompt, or the local one when there is none."""
        return self.global_prompt or self.local_prompt


_REQUIRED = ("image", "mask", "local_prompt")


def _item_from_record(record: dict[str, Any], base: Path, where: str) -> BenchItem:
    missing = [key for key in _REQUIRED if not str(record.get(key) or "").strip()]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}; each item needs image, mask and local_prompt "
                         "(id, global_prompt and mask_mode are optional)")
    image = (base / str(record["image"])).resolve()
    mask = (base / str(record["mask"])).resolve()
    for path, key in ((image, "image"), (mask, "mask")):
        if not path.is_file():
            raise ValueError(f"{where}: {key} file {str(path)!r} does not exist; paths are relative to the manifest")
    return BenchItem(id=str(record.get("id") or image.stem), image_path=image, mask_path=mask,
                     local_prompt=str(record["local_prompt"]).strip(),
                     global_prompt=str(record.get("global_prompt") or "").strip(),
                     mask_mode=str(record.get("mask_mode") or ""))


def _read_plain_folder(root: Path) -> list[BenchItem]:
    """The trainer's plain folder format (``training.trainer.data.FolderDataset``): ``NAME.<ext>`` image,
    ``NAME_mask.png`` (non-zero = region to generate here), ``NAME.txt`` local prompt, optional ``NAME.caption.txt``
    global prompt;
    subfolders included, id = NAME. Images without a mask or a prompt file are skipped."""
    items: list[BenchItem] = []
    seen: set[str] = set()
    for image in sorted(root.rglob("*")):
        if image.suffix.lower() not in IMAGE_EXTENSIONS or image.stem.endswith("_mask") or not image.is_file():
            continue
        mask = image.with_name(image.stem + "_mask.png")
        prompt = image.with_suffix(".txt")
        if not (mask.is_file() and prompt.is_file()):
            continue
        if image.stem in seen:
            raise ValueError(f"folder {root} has two images named {image.stem!r}; ids must be unique")
        seen.add(image.stem)
        caption = image.with_name(image.stem + ".caption.txt")
        items.append(BenchItem(id=image.stem, image_path=image.resolve(), mask_path=mask.resolve(),
                               local_prompt=prompt.read_text(encoding="utf-8").strip(),
                               global_prompt=caption.read_text(encoding="utf-8").strip() if caption.is_file() else ""))
    return items


def read_manifest(path: str | Path) -> list[BenchItem]:
    """Read a benchmark: a ``.jsonl`` (one JSON object a line) or ``.csv`` (header row) manifest, or a folder holding
    ``manifest.jsonl`` or ``manifest.csv``. Keys: ``image``, ``mask``, ``local_prompt`` (required), ``id`` (default:
    the image's file stem), ``global_prompt``, ``mask_mode``; relative paths are relative to the manifest's folder.
    A folder without a manifest is read in the trainer's plain folder format (see :func:`_read_plain_folder`).
    """
    source = Path(path).expanduser()
    if source.is_dir():
        for name in ("manifest.jsonl", "manifest.csv"):
            if (source / name).is_file():
                source = source / name
                break
        else:
            items = _read_plain_folder(source)
            if not items:
                raise ValueError(f"folder {str(path)!r} has no manifest.jsonl or manifest.csv and no NAME.<ext> + "
                                 "NAME_mask.png + NAME.txt triples; build a manifest with "
                                 "training/painterbench/manifest.py")
            return items
    if not source.is_file():
        raise ValueError(f"manifest {str(path)!r} does not exist; pass a .jsonl/.csv manifest or its folder")
    base = source.parent
    records: list[tuple[dict[str, Any], str]] = []
    if source.suffix.lower() in (".jsonl", ".json"):
        with source.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{source}:{number} is not JSON ({error}); write one object per line") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{source}:{number} is a {type(record).__name__}, not a JSON object")
                records.append((record, f"{source}:{number}"))
    elif source.suffix.lower() == ".csv":
        with source.open(encoding="utf-8", newline="") as handle:
            for number, record in enumerate(csv.DictReader(handle), 2):
                records.append((record, f"{source}:{number}"))
    else:
        raise ValueError(f"manifest {str(source)!r} has suffix {source.suffix!r}; use .jsonl or .csv")
    items = [_item_from_record(record, base, where) for record, where in records]
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise ValueError(f"manifest {source} repeats id {item.id!r}; ids must be unique (they name the outputs)")
        seen.add(item.id)
    return items


@runtime_checkable
class Generator(Protocol):
    """Gives the inpainted image of a benchmark item.

    Why a protocol: the evaluator does not care whether images were generated earlier (:class:`FolderGenerator`) or
    are produced now by a PainterNet branch through the reference pipeline (:class:`BranchGenerator`); either
    implements this one method.
    """

    def generate(self, item: BenchItem) -> Image.Image: ...


class FolderGenerator:
    """Already generated images in a folder, matched to an item by ``<id>.<ext>`` first (or the safe file name
    ``--save_generated`` gives an id with unsafe characters, see ``training.output_names``), then by the source
    image's file name (``<name>`` or ``<stem>.<ext>``); ext is one of png, jpg, jpeg, webp, bmp."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise ValueError(f"generated-images folder {str(folder)!r} does not exist; pass the folder of outputs")
        self._by_name = {path.name: path for path in self.folder.iterdir() if path.is_file()}
        self._by_stem: dict[str, Path] = {}
        for path in sorted(self._by_name.values()):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                self._by_stem.setdefault(path.stem, path)

    def find(self, item: BenchItem) -> Path:
        for stem in (item.id, safe_stem(item.id), item.image_path.stem):
            if stem in self._by_stem:
                return self._by_stem[stem]
        if item.image_path.name in self._by_name:
            return self._by_name[item.image_path.name]
        raise FileNotFoundError(f"no generated image for item {item.id!r} in {self.folder}: looked for "
                                f"{item.id}.<ext>, {item.image_path.stem}.<ext> and {item.image_path.name}")

    def generate(self, item: BenchItem) -> Image.Image:
        with Image.open(self.find(item)) as image:
            return image.convert("RGB")


#: Generation resolution by family (pixels per side of a square of the same area): what each base was trained at.
DEFAULT_RESOLUTION = {"sd15": 512, "sdxl": 1024}


def generation_size(width: int, height: int, multiple: int, resolution: int = 0) -> tuple[int, int]:
    """The (width, height) a base generates an item of ``width`` × ``height`` at: scaled to the area of a
    ``resolution``² square keeping the aspect ratio (``resolution=0``: the item's own size), then rounded to the
    nearest multiple the UNet accepts, at least one multiple per side."""
    if resolution:
        scale = resolution / math.sqrt(width * height)
        width, height = width * scale, height * scale
    return max(multiple, round(width / multiple) * multiple), max(multiple, round(height / multiple) * multiple)


def working_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``mask`` (H, W) in {0, 1} at ``size`` (width, height): a working pixel is hole when any part of it is, so a
    stroke thinner than the downscale still covers working pixels and the whole hole gets generated."""
    coverage = Image.fromarray((mask > 0.5).astype(np.uint8) * 255).resize(size, Image.BOX)
    return (np.asarray(coverage) > 0).astype(np.float32)


class BranchGenerator:
    """Inpaints every item now: a PainterNet branch file on its base model through the reference DDIM + CFG loop
    (``training.inference.inpaint``, the forward the parity tests tie to the ComfyUI nodes).

    Text input (``prompt="auto"``): the item's local prompt for PainterNet branches (the hole is conditioned on it,
    paper §3.1), its global prompt for BrushNet / PowerPaint files, which were trained on whole-image captions.
    Size: the item is resized to about ``resolution``² pixels (default: the family's training size; 0 keeps the
    item's size) at a multiple the UNet accepts (8 × 2^(levels-1): 64 for SD1.5, 32 for SDXL), generated, resized
    back, and the kept region is pasted from the source at full resolution, as a ComfyUI composite would, so the
    pixel metrics see exactly the source outside the hole (:func:`working_mask` keeps thin strokes in the hole).
    """

    def __init__(self, branch_path: str | Path, base_path: str | Path, *, single_file_config: str | None = None,
                 device: str = "cpu", dtype: str = "fp32", steps: int = 50, guidance_scale: float = 7.5,
                 scale: float = 1.0, seed: int = 0, prompt: str = "auto", resolution: int | None = None,
                 save_dir: str | Path | None = None):
        import torch

        from painternet_core.branch import PainterNetBranch
        from painternet_core.checkpoint import load_branch
        from training.inference import load_base_model

        if prompt not in ("auto", "local", "global"):
            raise ValueError(f"prompt={prompt!r}: use 'auto', 'local' (PainterNet) or 'global' (BrushNet-style)")
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        if resolution is not None and resolution < 0:
            raise ValueError(f"resolution={resolution} must be >= 0 (0 keeps each item's size)")
        dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        if dtype not in dtypes:
            raise ValueError(f"dtype={dtype!r}: use one of {sorted(dtypes)}")
        self.base = load_base_model(base_path, single_file_config)
        state, config = load_branch(str(branch_path))
        if config.family != self.base.family:
            raise ValueError(f"branch {str(branch_path)!r} is a {config.family} branch but the base "
                             f"{str(base_path)!r} is {self.base.family}; pass a base of the branch's family")
        self.branch = PainterNetBranch(config)
        self.branch.load_state_dict(state, strict=True)
        self.dtype = dtypes[dtype]
        self.device = torch.device(device)
        self.branch.to(self.device, self.dtype).eval()
        self.base.freeze_to(self.device, self.dtype)
        self.multiple = 8 * 2 ** (len(config.unet["block_out_channels"]) - 1)
        self.resolution = DEFAULT_RESOLUTION[config.family] if resolution is None else resolution
        self.steps, self.guidance_scale, self.scale, self.seed = steps, guidance_scale, scale, seed
        self.prompt = prompt if prompt != "auto" else ("local" if config.source_format == "painternet" else "global")
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.names = OutputNames(self.save_dir) if self.save_dir is not None else None
        if self.save_dir is not None:
            self.save_dir.mkdir(parents=True, exist_ok=True)

    def generate(self, item: BenchItem) -> Image.Image:
        import torch

        from training.inference import inpaint

        source = item.load_image()
        mask = item.load_mask()
        if not mask.any():
            raise ValueError(f"item {item.id!r}: mask {item.mask_path} is empty; every item needs a region to generate")
        size = generation_size(*source.size, self.multiple, self.resolution)
        work = source.resize(size, Image.LANCZOS) if size != source.size else source
        image = torch.from_numpy(np.asarray(work, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        hole = torch.from_numpy(working_mask(mask, size))[None, None]
        text = item.local_prompt if self.prompt == "local" else item.clip_prompt
        with torch.no_grad():
            out = inpaint(self.base, self.branch, image.to(self.device), hole.to(self.device), text,
                          config=self.branch.config, seed=self.seed, num_inference_steps=self.steps,
                          guidance_scale=self.guidance_scale, scale=self.scale, weight_dtype=self.dtype,
                          paste_back=False)
        generated = Image.fromarray((out[0].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))
        if generated.size != source.size:
            generated = generated.resize(source.size, Image.LANCZOS)
        result = np.where(mask[:, :, None] > 0.5, np.asarray(generated), np.asarray(source))
        image_out = Image.fromarray(result.astype(np.uint8))
        if self.names is not None:
            image_out.save(self.names.path(item.id, ".png"))
        return image_out


@dataclass
class MetricSuite:
    """The scorers of one run; ``None`` skips a metric (and drops its column). Pixel metrics need no model."""

    clip: ClipScorer | None = None
    aesthetic: AestheticScorer | None = None
    image_reward: PromptImageScorer | None = None
    gdino: GroundingDinoScorer | None = None
    lpips: LpipsScorer | None = None
    pixel_metrics: bool = True
    psnr_cap: float = PSNR_CAP_DB
    gdino_rule: str = "crop"

    def __post_init__(self) -> None:
        if self.gdino_rule not in GDINO_RULES:
            raise ValueError(f"gdino_rule={self.gdino_rule!r}: use one of {', '.join(GDINO_RULES)} (crop is the "
                             "paper's rule)")

    def columns(self) -> list[str]:
        """The metric columns this suite fills, in :data:`METRIC_COLUMNS` order."""
        crop = self.gdino is not None and self.gdino_rule in ("crop", "both")
        iou = self.gdino is not None and self.gdino_rule in ("iou", "both")
        present = {
            "clip_sim": self.clip is not None, "clip_sim_global": self.clip is not None,
            "local_clip_sim": self.clip is not None, "aesthetic": self.aesthetic is not None,
            "image_reward": self.image_reward is not None, "image_reward_global": self.image_reward is not None,
            "gdino_crop_hit": crop, "gdino_iou_hit": iou, "gdino_iou": iou,
            "psnr": self.pixel_metrics, "mse": self.pixel_metrics, "lpips": self.lpips is not None,
        }
        return [column for column in METRIC_COLUMNS if present[column]]

    def score(self, item: BenchItem, generated: Image.Image, reference: Image.Image,
              mask: np.ndarray) -> dict[str, float]:
        """All metrics of one item. CLIP values are 100·cosine, as in the paper's tables.

        Prompt-scored metrics use the local prompt (paper §4.1); the ``*_global`` variants score the global prompt
        and are NaN (an empty cell) for an item without one.
        """
        row: dict[str, float] = {}
        if self.clip is not None:
            crop = crop_mask_region(generated, mask)
            images, texts = [generated, crop], [item.local_prompt, item.local_prompt]
            if item.global_prompt:
                images.append(generated)
                texts.append(item.global_prompt)
            cosines = self.clip.cosine(images, texts)
            row["clip_sim"] = 100.0 * float(cosines[0])
            row["local_clip_sim"] = 100.0 * float(cosines[1])
            row["clip_sim_global"] = 100.0 * float(cosines[2]) if item.global_prompt else math.nan
        if self.aesthetic is not None:
            row["aesthetic"] = float(self.aesthetic.score([generated])[0])
        if self.image_reward is not None:
            row["image_reward"] = float(self.image_reward.score(item.local_prompt, generated))
            row["image_reward_global"] = (float(self.image_reward.score(item.global_prompt, generated))
                                          if item.global_prompt else math.nan)
        if self.gdino is not None:
            if self.gdino_rule in ("crop", "both"):
                row["gdino_crop_hit"] = float(self.gdino.crop_hit(generated, item.local_prompt, mask))
            if self.gdino_rule in ("iou", "both"):
                hit, iou = self.gdino.evaluate(generated, item.local_prompt, mask)
                row["gdino_iou_hit"] = float(hit)
                row["gdino_iou"] = iou
        if self.pixel_metrics:
            region = unmasked_region_metrics(generated, reference, mask, self.psnr_cap)
            row["psnr"] = region.psnr
            row["mse"] = region.mse
        if self.lpips is not None:
            row["lpips"] = self.lpips.distance(generated, reference, mask)
        return row


def evaluate(items: Sequence[BenchItem], generator: Generator, suite: MetricSuite, limit: int | None = None,
             skip_missing: bool = False, progress: bool = True, rank: int = 0,
             world_size: int = 1) -> list[dict[str, Any]]:
    """Score this process's share of the first ``limit`` items (rank r of ``world_size`` takes items r,
    r + world_size, ...); returns per-image rows (``ITEM_COLUMNS`` + the suite's columns) in item order.

    A generated image whose size differs from the source is resized to the source size (Lanczos) so the pixel
    metrics compare the same pixels. With ``skip_missing`` an item the generator cannot produce
    (``FileNotFoundError``) is logged and left out instead of stopping the run.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be >= 1 (or None for all items)")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size} is invalid; need 0 <= rank < world_size")
    chosen = list(items)[:limit] if limit is not None else list(items)
    chosen = chosen[rank::world_size]
    rows: list[dict[str, Any]] = []
    iterator: Iterable[BenchItem] = chosen
    if progress:
        from tqdm import tqdm

        iterator = tqdm(chosen, desc="evaluate", unit="img")
    for item in iterator:
        try:
            generated = generator.generate(item)
        except FileNotFoundError as error:
            if not skip_missing:
                raise
            logger.warning("skipping %s: %s", item.id, error)
            continue
        reference = item.load_image()
        mask = item.load_mask()
        if mask.shape != (reference.height, reference.width):
            raise ValueError(f"item {item.id!r}: mask {item.mask_path} is {mask.shape[1]}x{mask.shape[0]} but image "
                             f"is {reference.width}x{reference.height}; masks must match their images")
        if generated.size != reference.size:
            logger.debug("resizing generated %s from %s to %s", item.id, generated.size, reference.size)
            generated = generated.resize(reference.size, Image.LANCZOS)
        row: dict[str, Any] = {"id": item.id, "mask_mode": item.mask_mode, "mask_area": float(mask.mean()),
                               "local_prompt": item.local_prompt, "global_prompt": item.global_prompt}
        row.update(suite.score(item, generated, reference, mask))
        rows.append(row)
    return rows


def _metric_columns_of(rows: Sequence[dict[str, Any]]) -> list[str]:
    present = set().union(*(row.keys() for row in rows)) if rows else set()
    return [column for column in METRIC_COLUMNS if column in present]


def _format(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return "" if value is None else str(value)


def write_per_image_csv(rows: Sequence[dict[str, Any]], path: str | Path,
                        columns: Sequence[str] | None = None) -> list[str]:
    """Write ``ITEM_COLUMNS`` + metric columns (``columns`` or those present in ``rows``); NaN → empty cell.

    Returns the header written.
    """
    header = list(ITEM_COLUMNS) + list(columns if columns is not None else _metric_columns_of(rows))
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in rows:
            writer.writerow([_format(row.get(column)) for column in header])
    return header


def read_per_image_csv(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``per_image.csv`` back; metric cells become floats (empty → NaN)."""
    source = Path(path)
    if not source.is_file():
        raise ValueError(f"per-image CSV {str(path)!r} does not exist")
    rows = []
    with source.open(encoding="utf-8", newline="") as handle:
        for record in csv.DictReader(handle):
            row: dict[str, Any] = {}
            if "gdino_hit" in record:  # 0.1's name of the whole-image IoU rule's hit
                record["gdino_iou_hit"] = record.pop("gdino_hit")
            for key, value in record.items():
                if key in METRIC_COLUMNS or key == "mask_area":
                    row[key] = float(value) if value not in ("", None) else math.nan
                else:
                    row[key] = value
            rows.append(row)
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Means of every metric column: one row for ``all`` then one per mask kind (sorted), each with ``n`` items.

    NaN cells (undefined metrics) are left out of a mean; ``gdino_crop_hit``'s mean is the paper's Gdino accuracy.
    """
    columns = _metric_columns_of(rows)
    groups: dict[str, list[dict[str, Any]]] = {"all": list(rows)}
    for mode in sorted({str(row.get("mask_mode") or "") for row in rows} - {""}):
        groups[mode] = [row for row in rows if row.get("mask_mode") == mode]
    summary = []
    for name, members in groups.items():
        entry: dict[str, Any] = {"group": name, "n": len(members)}
        for column in columns:
            values = [float(row[column]) for row in members
                      if column in row and row[column] is not None and not math.isnan(float(row[column]))]
            entry[column] = float(np.mean(values)) if values else math.nan
        summary.append(entry)
    return summary


def write_summary(summary: Sequence[dict[str, Any]], csv_path: str | Path, markdown_path: str | Path) -> str:
    """Write the summary as CSV and as a markdown table; returns the markdown (what the CLI prints)."""
    columns = ["group", "n"] + [column for column in METRIC_COLUMNS if summary and column in summary[0]]
    with Path(csv_path).open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for entry in summary:
            writer.writerow([_format(entry.get(column)) for column in columns])

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.4f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(entry.get(column)) for column in columns) + " |" for entry in summary]
    markdown = "\n".join(lines) + "\n"
    Path(markdown_path).write_text(markdown, encoding="utf-8")
    return markdown


def merge_results(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Join per-image CSVs of the same benchmark by ``id`` (a later file's non-empty cell wins).

    Why: ImageReward runs in its own environment; its CSV and the main one become one table.
    """
    if not paths:
        raise ValueError("merge needs at least one per_image.csv")
    merged: dict[str, dict[str, Any]] = {}
    for path in paths:
        for row in read_per_image_csv(path):
            target = merged.setdefault(row["id"], {})
            for key, value in row.items():
                empty = value in ("", None) or (isinstance(value, float) and math.isnan(value))
                if not empty or key not in target:
                    target[key] = value
    return list(merged.values())


def _write_outputs(rows: Sequence[dict[str, Any]], out_dir: Path, columns: Sequence[str] | None) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_per_image_csv(rows, out_dir / "per_image.csv", columns)
    return write_summary(summarize(rows), out_dir / "summary.csv", out_dir / "summary.md")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="PainterBench-style evaluation: CLIP Sim, local CLIP Sim, aesthetic score, ImageReward, Gdino "
                    "accuracy, and PSNR/MSE/LPIPS on the unmasked region. Metrics whose model is not given are "
                    "skipped (their column is absent).")
    source = parser.add_argument_group("inputs")
    source.add_argument("--manifest", help="benchmark folder (with manifest.jsonl/.csv) or manifest file")
    source.add_argument("--generated", help="folder of generated images named <id>.<ext> or like the source image")
    source.add_argument("--branch", help="instead of --generated: inpaint now with this PainterNet .safetensors")
    source.add_argument("--base", help="with --branch: the base model (diffusers folder or single-file .safetensors)")
    source.add_argument("--merge", nargs="+", metavar="CSV",
                        help="instead of evaluating, join these per_image.csv files by id and summarise them")
    source.add_argument("--out_dir", required=True, help="writes per_image.csv, summary.csv, summary.md here")
    source.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")
    source.add_argument("--skip_missing", action="store_true", help="log and skip items without a generated image")
    models = parser.add_argument_group("models (local paths; nothing is downloaded)")
    models.add_argument("--clip", help="CLIPModel folder for CLIP Sim and local CLIP Sim (paper: ViT-L/14)")
    models.add_argument("--aesthetic_head", help="LAION aesthetic head state dict (.pth/.safetensors)")
    models.add_argument("--aesthetic_clip", help="CLIP ViT-L/14 folder for the aesthetic head (default: --clip)")
    models.add_argument("--image_reward", metavar="CKPT", help="ImageReward.pt (needs the optional image-reward pkg)")
    models.add_argument("--image_reward_med_config", metavar="JSON", help="ImageReward's med_config.json")
    models.add_argument("--gdino", help="GroundingDinoForObjectDetection folder (model + processor)")
    models.add_argument("--gdino_box_threshold", type=float, default=0.35)
    models.add_argument("--gdino_text_threshold", type=float, default=0.25)
    models.add_argument("--gdino_rule", choices=GDINO_RULES, default="crop",
                        help="Gdino accuracy rule: crop = the paper's (detect on the mask's crop, hit when the predicted "
                             "phrase matches the local prompt; column gdino_crop_hit), iou = detect on the whole image, "
                             "hit when a box overlaps the mask's box (gdino_iou_hit, gdino_iou), both")
    models.add_argument("--gdino_iou", type=float, default=0.5,
                        help="with --gdino_rule iou/both: IoU with the mask box that makes a hit")
    models.add_argument("--lpips_backbone", help="torchvision state dict of the LPIPS backbone (needs `lpips` pkg)")
    models.add_argument("--lpips_net", default="alex", choices=("alex", "vgg", "squeeze"))
    models.add_argument("--psnr_cap", type=float, default=PSNR_CAP_DB, help="PSNR reported for identical regions")
    models.add_argument("--no_pixel_metrics", action="store_true", help="skip PSNR/MSE (e.g. in the ImageReward env)")
    gen = parser.add_argument_group("generation (with --branch; reference DDIM + CFG loop)")
    gen.add_argument("--single_file_config", help="local diffusers folder giving a single-file base its configs")
    gen.add_argument("--steps", type=int, default=50, help="DDIM steps")
    gen.add_argument("--guidance_scale", type=float, default=7.5)
    gen.add_argument("--scale", type=float, default=1.0, help="branch strength (the node's `scale`)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--gen_prompt", choices=("auto", "local", "global"), default="auto",
                     help="text input of the generation: local prompt (auto for PainterNet branches) or global "
                          "prompt (auto for BrushNet/PowerPaint files)")
    gen.add_argument("--resolution", type=int, default=None,
                     help="generate at about RESOLUTION² pixels, aspect kept (default 512 SD1.5, 1024 SDXL; 0 = "
                          "each item's own size)")
    gen.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="generation weights dtype")
    gen.add_argument("--save_generated", help="also write the generated images here as <id>.png (ids with unsafe "
                                              "characters get a safe name; colliding names are refused up front)")
    parser.add_argument("--device", default="cpu", help="torch device for the models, e.g. cuda or cuda:1")
    parser.add_argument("--no_progress", action="store_true", help="no tqdm progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate (or merge); under ``accelerate launch`` / ``torchrun`` every process scores its own items and the main
    process writes the merged tables, rows in manifest order."""
    from training.cli import gather_in_order, parse_args, process_state, rank_device

    parser = build_parser()
    args = parse_args(parser, argv)
    state = process_state()
    args.device = rank_device(args.device, state)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    out_dir = Path(args.out_dir)
    if args.merge:
        if not state.is_main_process:  # one writer
            return 0
        try:
            markdown = _write_outputs(merge_results(args.merge), out_dir, None)
        except ValueError as error:
            parser.error(str(error))
        print(markdown, end="")
        return 0
    if not args.manifest or bool(args.generated) == bool(args.branch):
        parser.error("--manifest and exactly one of --generated or --branch are required (or use --merge)")
    if bool(args.branch) != bool(args.base):
        parser.error("--branch and --base go together: pass the branch file and its base model")
    if bool(args.image_reward) != bool(args.image_reward_med_config):
        parser.error("--image_reward and --image_reward_med_config go together: pass both local files")
    if args.aesthetic_head and not (args.aesthetic_clip or args.clip):
        parser.error("--aesthetic_head needs CLIP ViT-L/14: pass --aesthetic_clip (or --clip)")
    try:
        items = read_manifest(args.manifest)
        if args.save_generated:
            planned = OutputNames(args.save_generated)
            for item in items:  # a collision is refused before anything is generated or written
                planned.path(item.id, ".png")
        generator: Generator
        if args.branch:
            generator = BranchGenerator(args.branch, args.base, single_file_config=args.single_file_config,
                                        device=args.device, dtype=args.dtype, steps=args.steps,
                                        guidance_scale=args.guidance_scale, scale=args.scale, seed=args.seed,
                                        prompt=args.gen_prompt, resolution=args.resolution,
                                        save_dir=args.save_generated)
        else:
            generator = FolderGenerator(args.generated)
        clip = ClipScorer(args.clip, args.device) if args.clip else None
        aesthetic = None
        if args.aesthetic_head:
            same = clip is not None and (not args.aesthetic_clip or args.aesthetic_clip == args.clip)
            aesthetic_clip = clip if same else ClipScorer(args.aesthetic_clip, args.device)
            aesthetic = AestheticScorer(args.aesthetic_head, aesthetic_clip)
        suite = MetricSuite(
            clip=clip, aesthetic=aesthetic,
            image_reward=(ImageRewardScorer(args.image_reward, args.image_reward_med_config, args.device)
                          if args.image_reward else None),
            gdino=(GroundingDinoScorer(args.gdino, args.device, args.gdino_box_threshold,
                                       args.gdino_text_threshold, args.gdino_iou) if args.gdino else None),
            lpips=LpipsScorer(args.lpips_backbone, args.lpips_net, args.device) if args.lpips_backbone else None,
            pixel_metrics=not args.no_pixel_metrics, psnr_cap=args.psnr_cap, gdino_rule=args.gdino_rule)
    except (ValueError, RuntimeError) as error:
        parser.error(str(error))
    if not suite.columns():
        parser.error("no metric selected: give a model flag (e.g. --clip) or drop --no_pixel_metrics")
    mine = evaluate(items, generator, suite, limit=args.limit, skip_missing=args.skip_missing,
                    progress=not args.no_progress and state.is_local_main_process, rank=state.process_index,
                    world_size=state.num_processes)
    logger.info("rank %d/%d scored %d items", state.process_index, state.num_processes, len(mine))
    order = {item.id: n for n, item in enumerate(items)}
    rows = gather_in_order(mine, state, key=lambda row: order[row["id"]])
    if not state.is_main_process:
        return 0
    markdown = _write_outputs(rows, out_dir, suite.columns())
    print(markdown, end="")
    return 0


if __name__ == "__main__":
    from training.cli import end_processes

    raise SystemExit(end_processes(main()))
