"""PainterBench metrics (paper §4.1): the pure region arithmetic and the model-backed scorers.

Why a separate module: ``training/painterbench/evaluate.py`` (the benchmark driver) and
``training/painterdata/captions.py`` (the PainterData CLIP filter) share the same CLIP scorer and the same "crop the
mask's bounding box, pad to a square" rule, so a local
caption is filtered on exactly the view that the local CLIP metric later scores.

Conventions (DESIGN §2): a mask is float HxW in [0, 1], **1 = region to generate**; it is binarised at 0.5. Images
are PIL RGB. Every model comes from a local path; nothing here downloads anything. transformers, lpips and
ImageReward are imported lazily, inside the scorer that needs them, so the pixel metrics run with numpy alone.
"""
from __future__ import annotations

import logging
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger("painternet.training")

__all__ = [
    "PSNR_CAP_DB",
    "PAD_FILL",
    "Box",
    "binarize_mask",
    "mask_bbox",
    "square_crop",
    "crop_mask_region",
    "RegionMetrics",
    "unmasked_region_metrics",
    "box_iou",
    "grounding_hit",
    "normalize_phrase",
    "phrase_matches",
    "ClipScorer",
    "load_state_dict_file",
    "load_aesthetic_head",
    "AestheticScorer",
    "GroundingDinoScorer",
    "LpipsScorer",
    "PromptImageScorer",
    "ImageRewardScorer",
]

#: PSNR of two identical unmasked regions is +inf; it is reported as this many dB so means stay finite.
#: 100 dB is far above any real reconstruction (8-bit quantisation alone caps real differences near 48-60 dB).
PSNR_CAP_DB: float = 100.0

#: Fill colour of the padding that makes the bounding-box crop square (black, the masked-image fill BrushNet uses).
PAD_FILL: tuple[int, int, int] = (0, 0, 0)

#: (x0, y0, x1, y1) in pixels, x1/y1 exclusive (the PIL ``crop`` convention).
Box = tuple[int, int, int, int]


# --------------------------------------------------------------------------------------------------------------------
# Pure region arithmetic
# --------------------------------------------------------------------------------------------------------------------

def binarize_mask(mask: np.ndarray) -> np.ndarray:
    """Return a bool HxW array, True where the mask is >= 0.5 (the region to generate).

    Why: masks arrive as {0,1} floats, 0/255 PNGs read as floats, or soft masks; one threshold keeps every metric on
    the same pixel set.
    """
    array = np.asarray(mask)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"mask must be HxW, got shape {array.shape}; pass a single-channel mask")
    return array >= 0.5


def mask_bbox(mask: np.ndarray) -> Box:
    """Bounding box (x0, y0, x1, y1), exclusive ends, of the mask's region to generate.

    Why: the local CLIP crop, the Grounding-DINO target and the caption crop are all this box.
    """
    hole = binarize_mask(mask)
    ys, xs = np.nonzero(hole)
    if ys.size == 0:
        raise ValueError("mask is empty (no pixel >= 0.5): a bounding box needs at least one masked pixel; "
                         "drop this item or give a mask with 1 = region to generate")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def square_crop(image: Image.Image, box: Box, fill: tuple[int, int, int] = PAD_FILL) -> Image.Image:
    """Crop ``box`` and pad it to a square of side max(w, h), the crop **centred**, padding in ``fill``.

    When the size difference is odd the extra padding pixel goes to the right / bottom. Why pad instead of resizing
    or enlarging the box: CLIP's processor resizes the short side and centre-crops, which would cut off part of a
    long thin region; padding keeps the whole region visible and adds no image content from outside the mask box.
    """
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height):
        raise ValueError(f"box {box} is not inside the {image.width}x{image.height} image; "
                         "pass (x0, y0, x1, y1) with exclusive ends inside the image")
    crop = image.convert("RGB").crop(box)
    width, height = crop.size
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(crop, ((side - width) // 2, (side - height) // 2))
    return canvas


def crop_mask_region(image: Image.Image, mask: np.ndarray, fill: tuple[int, int, int] = PAD_FILL) -> Image.Image:
    """The square view of the generated region: :func:`square_crop` of :func:`mask_bbox`."""
    hole = binarize_mask(mask)
    if hole.shape != (image.height, image.width):
        raise ValueError(f"mask shape {hole.shape} differs from image size (h={image.height}, w={image.width}); "
                         "resize the mask to the image first")
    return square_crop(image, mask_bbox(hole), fill)


@dataclass(frozen=True)
class RegionMetrics:
    """Preservation metrics over the unmasked (known) pixels; NaN when the mask covers the whole image."""

    mse: float
    psnr: float


def _as_float_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {array.shape}; convert it to RGB first")
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    return array.astype(np.float64)


def unmasked_region_metrics(generated: Image.Image | np.ndarray, reference: Image.Image | np.ndarray,
                            mask: np.ndarray, psnr_cap: float = PSNR_CAP_DB) -> RegionMetrics:
    """MSE and PSNR between generated and reference over the pixels the mask keeps (mask < 0.5).

    Values are in [0, 1] (uint8 / 255); MSE is the mean over kept pixels *and* the 3 channels; PSNR = 10·log10(1/MSE)
    dB, capped at ``psnr_cap`` (identical regions give MSE 0 → the cap). Why only the unmasked region: it measures
    how well the inpainting preserved what the user did not ask to change (BrushBench's preservation metrics).
    """
    gen = _as_float_rgb(generated)
    ref = _as_float_rgb(reference)
    if gen.shape != ref.shape:
        raise ValueError(f"generated {gen.shape} and reference {ref.shape} differ in size; "
                         "resize the generated image to the reference size first")
    keep = ~binarize_mask(mask)
    if keep.shape != gen.shape[:2]:
        raise ValueError(f"mask shape {keep.shape} differs from image shape {gen.shape[:2]}; resize the mask first")
    if not keep.any():
        return RegionMetrics(mse=math.nan, psnr=math.nan)
    mse = float(np.mean((gen[keep] - ref[keep]) ** 2))
    psnr = psnr_cap if mse <= 0.0 else min(psnr_cap, 10.0 * math.log10(1.0 / mse))
    return RegionMetrics(mse=mse, psnr=psnr)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes (0 when either is degenerate)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return float(inter / union) if union > 0 else 0.0


def grounding_hit(boxes: Sequence[Sequence[float]], region: Sequence[float],
                  iou_threshold: float = 0.5) -> tuple[bool, float]:
    """The Gdino-accuracy rule on already-thresholded detections: (hit, best IoU).

    hit ⇔ some detection of the local prompt has IoU >= ``iou_threshold`` with the mask's bounding box ``region``;
    best IoU is 0 with no detection. Why IoU with the mask box: the object must be found *where it was asked for*,
    not anywhere in the image (a copy of it in the untouched background must not count).
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold={iou_threshold} must be in (0, 1]; 0.5 is the documented default")
    best = max((box_iou(box, region) for box in boxes), default=0.0)
    return best >= iou_threshold, best


_ARTICLES = frozenset({"a", "an", "the"})


def normalize_phrase(text: str) -> str:
    """Lower-case words without punctuation or articles: "A red car." → "red car"."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return " ".join(word for word in words if word not in _ARTICLES)


def phrase_matches(phrase: str, prompt: str) -> bool:
    """The paper's Gdino-accuracy test of one detection: is its predicted phrase consistent with the local prompt?

    Rule (documented default): equal after :func:`normalize_phrase`. Why not "any detection": Grounding DINO's
    phrase is made of the prompt tokens whose score passes the text threshold, so a detection of only "car" for
    "a red car" found a car but not the *red* car the prompt asked for.
    """
    normalized = normalize_phrase(prompt)
    return bool(normalized) and normalize_phrase(phrase) == normalized


# --------------------------------------------------------------------------------------------------------------------
# Model-backed scorers (each loads from a local path only)
# --------------------------------------------------------------------------------------------------------------------

def _local_dir(path: str | Path, what: str, flag: str) -> str:
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise ValueError(f"{what} path {str(path)!r} does not exist; pass a local folder saved with "
                         f"save_pretrained() to {flag} (models are never downloaded)")
    return str(resolved)


def _features(output: Any) -> torch.Tensor:
    """get_image/text_features return a tensor in transformers 4.x and a model output in some later versions."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"cannot read CLIP features from {type(output).__name__}")


class ClipScorer:
    """CLIP image/text embeddings (L2-normalised) and their cosine similarity, from a local ``CLIPModel`` folder.

    Why one class: CLIP Sim, local CLIP Sim, the aesthetic head's input and the PainterData caption filter all use the
    same projection embeddings; loading the model once serves all of them.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import CLIPModel, CLIPProcessor

        local = _local_dir(path, "CLIP model", "--clip")
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(local).to(self.device, dtype).eval()
        self.processor = CLIPProcessor.from_pretrained(local)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) float32 L2-normalised image projection embeddings."""
        pixels = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]
        feats = _features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype)))
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu()

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) float32 L2-normalised text projection embeddings (prompts truncated to CLIP's context length)."""
        tokens = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True,
                                max_length=self.max_length)
        feats = _features(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                       attention_mask=tokens["attention_mask"].to(self.device)))
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu()

    def cosine(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        """(N,) cosine similarity of image i with text i (raw, in [-1, 1]; the paper's tables show 100·cos)."""
        if len(images) != len(texts):
            raise ValueError(f"got {len(images)} images and {len(texts)} texts; pass one text per image")
        if not images:
            return torch.zeros(0)
        return (self.image_embeds(images) * self.text_embeds(texts)).sum(dim=-1)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file, or a tensor-only ``torch.save`` state dict (loaded with weights_only=True)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist; pass a local .safetensors or .pth file")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    state = torch.load(str(file), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict; save model.state_dict()")
    return state


class _LinearChain(torch.nn.Module):
    """Linear layers applied in order with no activation: the LAION improved-aesthetic-predictor MLP at eval time
    (its ReLUs are commented out upstream and Dropout is the identity in eval)."""

    def __init__(self, layers: Sequence[torch.nn.Linear]):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def load_aesthetic_head(path: str | Path) -> torch.nn.Module:
    """Build the LAION aesthetic head from its state dict; two formats are accepted, told apart by their keys.

    * ``weight``/``bias`` — the original LAION-Aesthetics linear predictor (``sa_0_4_vit_l_14_linear.pth``,
      ``Linear(768, 1)``).
    * ``layers.{i}.weight``/``layers.{i}.bias`` — the improved-aesthetic-predictor MLP
      (``sac+logos+ava1-l14-linearMSE.pth``: 768→1024→128→64→16→1, Dropout between, no activation); the linears are
      applied in index order.
    Why both: BrushBench/PainterBench report the "Aesthetic Score" of the improved predictor; the linear one is the
    older published head and costs nothing to support.
    """
    state = load_state_dict_file(path)
    if set(state) == {"weight", "bias"}:
        weights = [(state["weight"], state["bias"])]
    else:
        indices: set[int] = set()
        for key in state:
            match = re.fullmatch(r"layers\.(\d+)\.(weight|bias)", key)
            if match is None:
                raise ValueError(f"aesthetic head {str(path)!r} has unexpected key {key!r}; expected 'weight'/'bias' "
                                 "(LAION linear) or 'layers.N.weight'/'layers.N.bias' (improved-aesthetic-predictor)")
            indices.add(int(match.group(1)))
        if not indices:
            raise ValueError(f"aesthetic head {str(path)!r} is empty; pass the LAION head's state dict")
        try:
            weights = [(state[f"layers.{i}.weight"], state[f"layers.{i}.bias"]) for i in sorted(indices)]
        except KeyError as missing:
            raise ValueError(f"aesthetic head {str(path)!r} lacks {missing}; each linear needs weight and bias") from None
    layers = []
    for n, (weight, bias) in enumerate(weights):
        if weight.ndim != 2 or bias.shape != weight.shape[:1]:
            raise ValueError(f"aesthetic head layer {n} has weight {tuple(weight.shape)} and bias {tuple(bias.shape)}; "
                             "expected (out, in) and (out,)")
        if n and weight.shape[1] != weights[n - 1][0].shape[0]:
            raise ValueError(f"aesthetic head layer {n} takes {weight.shape[1]} inputs but the previous layer gives "
                             f"{weights[n - 1][0].shape[0]}; the file is not a linear chain")
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
        linear.load_state_dict({"weight": weight.float(), "bias": bias.float()})
        layers.append(linear)
    if layers[-1].out_features != 1:
        raise ValueError(f"aesthetic head ends with {layers[-1].out_features} outputs; a score head ends with 1")
    return _LinearChain(layers).eval()


class AestheticScorer:
    """LAION aesthetic score: the head applied to the L2-normalised CLIP ViT-L/14 image projection embedding.

    The CLIP given must be the one the head was trained on (openai/clip-vit-large-patch14, 768-d); a width mismatch is
    refused rather than silently producing meaningless scores.
    """

    def __init__(self, head_path: str | Path, clip: ClipScorer):
        self.head = load_aesthetic_head(head_path)
        self.clip = clip
        width = int(clip.model.config.projection_dim)
        if self.head.layers[0].in_features != width:
            raise ValueError(f"aesthetic head expects {self.head.layers[0].in_features}-d embeddings but the CLIP "
                             f"model gives {width}-d; pass CLIP ViT-L/14 (768-d) with --aesthetic_clip")

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N,) aesthetic scores (about 1-10 for the real LAION head)."""
        return self.head(self.clip.image_embeds(images))[:, 0]


_SPECIAL_TOKEN = re.compile(r"\[(CLS|SEP|PAD|UNK|MASK)\]")


class GroundingDinoScorer:
    """Grounding-DINO detections of the local prompt, and the two Gdino-accuracy rules.

    A detection counts when its box score >= ``box_threshold`` (0.35) and its phrase — the prompt tokens scoring
    >= ``text_threshold`` (0.25), special tokens and '.' removed — is not empty (the Grounding-DINO demo defaults);
    the prompt goes in lower-cased, ending in '.'. Gdino Acc is the mean hit rate of a rule:

    * :meth:`crop_hit` — the paper's rule (§4.1, the default): the generated region is cut out by the mask (its
      bounding box; no square padding, the detector takes any aspect ratio), the detector runs on it with the local
      prompt, and the item is a hit when a counted detection's phrase matches the prompt (:func:`phrase_matches`);
    * :meth:`evaluate` — the whole-image rule (an option): the whole generated image goes in, and the item is a hit
      when the best IoU of a counted box with the mask's bounding box is >= ``iou_threshold`` (0.5).
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", box_threshold: float = 0.35,
                 text_threshold: float = 0.25, iou_threshold: float = 0.5):
        from transformers import AutoProcessor, GroundingDinoForObjectDetection

        for name, value in (("box_threshold", box_threshold), ("text_threshold", text_threshold),
                            ("iou_threshold", iou_threshold)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} must be in [0, 1]")
        local = _local_dir(path, "Grounding DINO", "--gdino")
        self.device = torch.device(device)
        self.model = GroundingDinoForObjectDetection.from_pretrained(local).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(local)
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.iou_threshold = iou_threshold

    @staticmethod
    def query(prompt: str) -> str:
        """Grounding DINO was trained on lower-case phrases terminated by '.'."""
        text = prompt.strip().lower()
        return text if text.endswith(".") else text + "."

    @torch.no_grad()
    def detect(self, image: Image.Image, prompt: str) -> list[tuple[tuple[float, float, float, float], float, str]]:
        """Counted detections as (box in pixels, box score, phrase), best score first."""
        image = image.convert("RGB")
        inputs = self.processor(images=image, text=self.query(prompt), return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        post = self.processor.post_process_grounded_object_detection
        sizes = [(image.height, image.width)]
        try:
            result = post(outputs, inputs["input_ids"], threshold=self.box_threshold,
                          text_threshold=self.text_threshold, target_sizes=sizes)[0]
        except TypeError:  # transformers < 4.51 named it box_threshold
            result = post(outputs, inputs["input_ids"], box_threshold=self.box_threshold,
                          text_threshold=self.text_threshold, target_sizes=sizes)[0]
        labels = result["text_labels"] if "text_labels" in result else result["labels"]
        detections = []
        for box, score, label in zip(result["boxes"].tolist(), result["scores"].tolist(), labels):
            phrase = _SPECIAL_TOKEN.sub(" ", str(label)).replace(".", " ").strip()
            if phrase:
                detections.append((tuple(float(v) for v in box), float(score), " ".join(phrase.split())))
        return sorted(detections, key=lambda detection: -detection[1])

    def crop_hit(self, image: Image.Image, prompt: str, mask: np.ndarray) -> bool:
        """The paper's rule: does a detection on the mask's crop of ``image`` predict the local prompt's phrase?"""
        crop = image.convert("RGB").crop(mask_bbox(mask))
        return any(phrase_matches(phrase, prompt) for _, _, phrase in self.detect(crop, prompt))

    def evaluate(self, image: Image.Image, prompt: str, mask: np.ndarray) -> tuple[bool, float]:
        """The whole-image rule: (hit, best IoU) of the local prompt's detections against the mask's bounding box."""
        region = mask_bbox(mask)
        return grounding_hit([box for box, _, _ in self.detect(image, prompt)], region, self.iou_threshold)


class LpipsScorer:
    """LPIPS on the unmasked region, from the optional ``lpips`` package and a local backbone file.

    Both images get the hole painted black before LPIPS (BrushBench's masked LPIPS), so only the preserved region
    differs. Weights: the learned linear layers ship inside the ``lpips`` wheel; the backbone is a torchvision
    state dict (e.g. ``alexnet-owt-7be5be79.pth`` from the torch hub cache) of which only ``features.*`` is used.
    """

    def __init__(self, backbone_path: str | Path, net: str = "alex", device: str | torch.device = "cpu"):
        try:
            import lpips
        except ImportError as error:
            raise RuntimeError("LPIPS needs the optional `lpips` package: `pip install lpips` (no other dependency "
                               "changes), or drop --lpips_backbone") from error
        if net not in ("alex", "vgg", "squeeze"):
            raise ValueError(f"lpips net {net!r} is not one of alex, vgg, squeeze")
        self.device = torch.device(device)
        with warnings.catch_warnings():  # lpips calls torchvision's deprecated `pretrained=`; nothing to act on
            warnings.simplefilter("ignore", UserWarning)
            self.model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        backbone = load_state_dict_file(backbone_path)
        mapped = {}
        for name in self.model.net.state_dict():
            match = re.fullmatch(r"slice\d+\.(\d+)\.(.+)", name)
            source = f"features.{match.group(1)}.{match.group(2)}" if match else name
            if source not in backbone:
                raise ValueError(f"backbone file {str(backbone_path)!r} lacks {source!r}; pass the torchvision "
                                 f"{net} state dict that matches --lpips_net {net}")
            mapped[name] = backbone[source]
        self.model.net.load_state_dict(mapped)
        self.model = self.model.to(self.device).eval()

    @torch.no_grad()
    def distance(self, generated: Image.Image, reference: Image.Image, mask: np.ndarray) -> float:
        """LPIPS distance of the two images with the hole set to black in both (NaN if nothing is kept)."""
        keep = ~binarize_mask(mask)
        if not keep.any():
            return math.nan

        def tensor(image: Image.Image) -> torch.Tensor:
            array = _as_float_rgb(image) * keep[..., None]
            return torch.from_numpy(array).float().permute(2, 0, 1)[None].to(self.device) * 2.0 - 1.0

        return float(self.model(tensor(generated), tensor(reference)).item())


@runtime_checkable
class PromptImageScorer(Protocol):
    """A prompt-conditioned image score (ImageReward or any human-preference model): higher is better."""

    def score(self, prompt: str, image: Image.Image) -> float: ...


class ImageRewardScorer:
    """ImageReward (Xu et al. 2023) through the optional ``image-reward`` package, from local files only.

    Why optional: ``image-reward`` pins an old transformers/timm, so it usually lives in its own virtual environment;
    run ``training/painterbench/evaluate.py`` there with only ``--image_reward`` (plus the pixel metrics, which need
    no model) and
    join the CSVs with ``--merge``. Offline use needs the checkpoint (``ImageReward.pt``), its ``med_config.json``,
    and the ``bert-base-uncased`` tokenizer already in the Hugging Face cache with ``HF_HUB_OFFLINE=1``.
    """

    def __init__(self, checkpoint: str | Path, med_config: str | Path, device: str | torch.device = "cpu"):
        try:
            import ImageReward as image_reward  # noqa: N813  (the package's module name)
        except ImportError as error:
            raise RuntimeError(
                "--image_reward needs the optional `image-reward` package, which pins transformers/timm versions "
                "this project does not use: create a separate venv (`pip install image-reward`), run "
                "`python training/painterbench/evaluate.py ... --image_reward CKPT --image_reward_med_config JSON "
                "--out_dir "
                "eval_ir` there, then `python training/painterbench/evaluate.py --merge eval/per_image.csv "
                "eval_ir/per_image.csv --out_dir eval_all` here") from error
        for path, flag in ((checkpoint, "--image_reward"), (med_config, "--image_reward_med_config")):
            if not Path(path).expanduser().is_file():
                raise ValueError(f"{flag} file {str(path)!r} does not exist; pass the local file")
        self.model = image_reward.load(str(checkpoint), device=str(device), med_config=str(med_config))

    def score(self, prompt: str, image: Image.Image) -> float:
        return float(self.model.score(prompt, image.convert("RGB")))
