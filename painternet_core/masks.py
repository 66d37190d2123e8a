"""The paper's training / test masks (PainterNet §3.4 Eq. 6, supplement §6.2 and Algorithm 1).

PainterNet is trained on three mask kinds derived from one segmentation mask `m_seg` so the model stops relying on
the exact object outline that segmentation masks leak (users paint coarse boxes and finger scribbles):

* ``segmentation``: `m_seg` itself;
* ``box``: the bounding box of `m_seg`'s non-zero pixels, randomly expanded;
* ``irregular``: `m_seg` dilated with a kernel size and iteration count chosen from its coverage ratio
  ``r = area / (h * w)``, then random lines / circles / squares drawn from random non-zero points (Algorithm 1);
* ``paper_mix``: Eq. 6, ``k ~ U[0, 1]``: box if ``k <= 0.25``, irregular if ``0.25 < k <= 0.75``, segmentation
  otherwise; a box of the mix is a square with probability ``PAPER_MIX_SQUARE_SHARE`` ("rectangular or square").

The only numbers the paper gives are Eq. 6's 0.25 and 0.75; they are used as given (`PAPER_BOX_MAX_K`,
`PAPER_IRREGULAR_MAX_K`). Algorithm 1 names its steps (ratio bands -> kernel and iterations, number of drawings,
angle / length / brush width, line/circle/square) but gives no values, so every such number is a named, documented
field of `IrregularMaskParams` (and `DEFAULT_BOX_EXPAND` for the box), expressed as fractions of the image's short
side so one default serves 512² and 1024² alike.

Conventions (DESIGN.md §2): output float32 in {0, 1}, same H×W as the input, **1 = region to generate**. Every
random choice is drawn from the `numpy.random.Generator` passed in, so a mask is a pure function of (input, generator
state, parameters); the trainer's data pipeline and the ComfyUI node call these same functions. Morphology and
drawing use OpenCV on uint8 images (no per-pixel Python) so the trainer's workers keep up with the GPU.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, NamedTuple

import cv2
import numpy as np

MaskKind = Literal["segmentation", "box", "irregular"]
MaskMode = Literal["segmentation", "box", "irregular", "paper_mix"]
MASK_KINDS: tuple[str, ...] = ("segmentation", "box", "irregular")
MASK_MODES: tuple[str, ...] = ("segmentation", "box", "irregular", "paper_mix")
STROKE_SHAPES: tuple[str, ...] = ("line", "circle", "square")

# Eq. 6 of the paper, used exactly as given.
PAPER_BOX_MAX_K = 0.25
PAPER_IRREGULAR_MAX_K = 0.75

# Float inputs (ComfyUI MASKs can be feathered) count a pixel as part of the segmentation from this value up;
# bool and integer inputs count every non-zero pixel, which is the paper's "non-zero pixel locations".
FLOAT_THRESHOLD = 0.5

# Box expansion, per side, as a fraction of the box's own width (left/right) or height (top/bottom). The paper only
# says "randomly expand"; up to 30 % per side gives boxes from tight to generous without swallowing the image.
DEFAULT_BOX_EXPAND: tuple[float, float] = (0.0, 0.3)

# Share of the paper mix's boxes that are squares. The paper says box masks are "rectangular or square" (§3.4) and
# gives no proportion; half and half keeps both shapes common. A plain ``box`` mask stays rectangular (share 0).
PAPER_MIX_SQUARE_SHARE = 0.5

FloatRange = tuple[float, float]
IntRange = tuple[int, int]


@dataclass(frozen=True)
class DilationBand:
    """Dilation used when the coverage ratio r is at most `max_ratio` (the first matching band wins).

    `kernel` is the range of the square kernel's side as a fraction of the image's short side (drawn uniformly,
    rounded, at least 1 px); `iterations` the inclusive range of `cv2.dilate` iterations (drawn uniformly).
    """

    max_ratio: float
    kernel: FloatRange
    iterations: IntRange


# Algorithm 1 steps 6-7 pick the kernel and iterations from r but give no values. Small objects get the largest
# relative growth (a user's finger covers a small object with a wide margin), large ones the least (growing an object
# that already covers half the image mostly produces a full-image mask, which teaches nothing).
DEFAULT_DILATION_BANDS: tuple[DilationBand, ...] = (
    DilationBand(max_ratio=0.05, kernel=(0.03, 0.05), iterations=(1, 3)),
    DilationBand(max_ratio=0.2, kernel=(0.02, 0.04), iterations=(1, 2)),
    DilationBand(max_ratio=0.5, kernel=(0.01, 0.03), iterations=(1, 2)),
    DilationBand(max_ratio=1.0, kernel=(0.005, 0.015), iterations=(1, 1)),
)


@dataclass(frozen=True)
class IrregularMaskParams:
    """Every number Algorithm 1 (m_irr) leaves open, with defaults that suit 512² and 1024² images.

    Lengths and widths are fractions of the image's short side ``s = min(h, w)`` so the same defaults draw the same
    looking scribbles at any resolution (at 512²: strokes 26-128 px long, brush 10-31 px wide).

    - `dilation_bands`: coverage-ratio bands -> kernel size and iteration ranges (Algorithm 1 steps 6-8).
    - `dilation_scale`: multiplies every kernel size; 0 disables dilation (kernel 1 px), 2 doubles it.
    - `kernel_shape`: ``"rect"`` (what ``cv2.dilate(m, np.ones((k, k)), iter)`` does, and fastest) or ``"ellipse"``
      (rounder outlines, slower).
    - `strokes`: inclusive range of the number of drawings, each from its own random non-zero start point (step 14).
    - `segments`: inclusive range of sub-iterations per drawing (step 17); each one continues from the previous
      segment's end point, like a finger moving on a screen.
    - `length`: range of a segment's length (fraction of s); `width`: range of the brush width (fraction of s, at
      least 1 px) (step 18). Angles are uniform in [0, 2π).
    - `shape_weights`: relative probabilities of (line, circle, square) per segment (step 19). A line is a thick
      segment of the drawn length and width; a circle is a filled disc of radius = width centred on the segment's end
      point; a square is a filled square of side 2·width centred there, rotated by the segment's angle.
    """

    dilation_bands: tuple[DilationBand, ...] = DEFAULT_DILATION_BANDS
    dilation_scale: float = 1.0
    kernel_shape: Literal["rect", "ellipse"] = "rect"
    strokes: IntRange = (1, 4)
    segments: IntRange = (1, 5)
    length: FloatRange = (0.05, 0.25)
    width: FloatRange = (0.02, 0.06)
    shape_weights: tuple[float, float, float] = (0.6, 0.2, 0.2)

    def __post_init__(self) -> None:
        if not self.dilation_bands:
            raise ValueError("IrregularMaskParams.dilation_bands is empty; give at least one band with max_ratio=1.0")
        previous = -math.inf
        for i, band in enumerate(self.dilation_bands):
            if not band.max_ratio > previous:
                raise ValueError(f"IrregularMaskParams.dilation_bands[{i}].max_ratio={band.max_ratio} is not above the "
                                 f"previous band's {previous}; sort the bands by increasing max_ratio")
            previous = band.max_ratio
            _check_range(f"dilation_bands[{i}].kernel", band.kernel, low=0.0)
            _check_range(f"dilation_bands[{i}].iterations", band.iterations, low=1, integer=True)
        if self.dilation_bands[-1].max_ratio < 1.0:
            raise ValueError(f"IrregularMaskParams.dilation_bands[-1].max_ratio={self.dilation_bands[-1].max_ratio} "
                             "leaves coverage ratios up to 1.0 without a band; end the bands with max_ratio=1.0")
        if not (math.isfinite(self.dilation_scale) and self.dilation_scale >= 0):
            raise ValueError(f"IrregularMaskParams.dilation_scale={self.dilation_scale!r} must be a finite number >= 0 "
                             "(1.0 = default dilation, 0 = none)")
        if self.kernel_shape not in ("rect", "ellipse"):
            raise ValueError(f"IrregularMaskParams.kernel_shape={self.kernel_shape!r} is not one of 'rect', 'ellipse'")
        _check_range("strokes", self.strokes, low=0, integer=True)
        _check_range("segments", self.segments, low=1, integer=True)
        _check_range("length", self.length, low=0.0)
        _check_range("width", self.width, low=0.0)
        weights = self.shape_weights
        if (len(weights) != 3 or not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0):
            raise ValueError(f"IrregularMaskParams.shape_weights={weights!r} must be three finite weights >= 0 for "
                             "(line, circle, square) with a positive sum, e.g. (0.6, 0.2, 0.2)")


def _check_range(name: str, value: Any, *, low: float, integer: bool = False) -> None:
    """Refuse a (lo, hi) pair that is not ordered, finite, of the right type and at least `low`."""
    kind = "integers" if integer else "numbers"
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be a (min, max) pair of {kind}") from None
    types = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if (not isinstance(lo, types) or not isinstance(hi, types) or isinstance(lo, bool) or isinstance(hi, bool)
            or not (math.isfinite(lo) and math.isfinite(hi))):
        raise ValueError(f"{name}={value!r} must be a (min, max) pair of finite {kind}")
    if lo < low or hi < lo:
        raise ValueError(f"{name}={value!r} needs {low} <= min <= max; swap or raise the values")


class MixedMask(NamedTuple):
    """A paper-mix draw: the mask and which kind Eq. 6 picked (the trainer logs the kind frequencies)."""

    mask: np.ndarray
    kind: str


# ----------------------------------------------------------------------------------------------------------- inputs


def _as_binary_u8(seg: Any) -> np.ndarray:
    """Validate a 2-D segmentation and return it as a contiguous uint8 {0, 1} image (what cv2 works on fastest)."""
    if not isinstance(seg, np.ndarray):
        raise ValueError(f"segmentation must be a numpy array, got {type(seg).__name__}; convert it first "
                         "(torch: t.detach().cpu().numpy())")
    if seg.ndim != 2:
        raise ValueError(f"segmentation must be 2-D (H, W), got shape {seg.shape}; pass one mask at a time "
                         "(index a batch, squeeze a channel axis)")
    if seg.shape[0] == 0 or seg.shape[1] == 0:
        raise ValueError(f"segmentation has an empty shape {seg.shape}; it needs at least 1x1 pixels")
    if seg.dtype == np.bool_ or np.issubdtype(seg.dtype, np.integer):
        return np.not_equal(seg, 0).view(np.uint8)
    if np.issubdtype(seg.dtype, np.floating):
        if np.isnan(seg.max()):
            raise ValueError("segmentation contains NaN; replace it (np.nan_to_num) before generating a mask")
        return np.greater_equal(seg, FLOAT_THRESHOLD).view(np.uint8)
    raise ValueError(f"segmentation dtype {seg.dtype} is not supported; use bool, an integer type (non-zero = "
                     "object) or a float type (>= 0.5 = object)")


def _check_rng(rng: Any) -> None:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}; "
                        "use numpy.random.default_rng(seed)")


def _to_float(u8: np.ndarray) -> np.ndarray:
    return u8.astype(np.float32)


# ------------------------------------------------------------------------------------------------------------ kinds


def segmentation_mask(seg: np.ndarray) -> np.ndarray:
    """m_seg: the segmentation itself, binarised to float32 {0, 1} (a copy, so callers may modify it freely)."""
    return _to_float(_as_binary_u8(seg))


def box_mask(seg: np.ndarray, rng: np.random.Generator,
             expand: FloatRange = DEFAULT_BOX_EXPAND, square_share: float = 0.0) -> np.ndarray:
    """m_box: the bounding box of the non-zero pixels, each side pushed out by a random fraction of the box size.

    Each of the four sides moves outwards independently by ``u * size`` pixels (rounded), ``u ~ U[expand]``, with
    size = box width for left/right and box height for top/bottom; the result is clipped to the image, so it is
    always exactly one axis-aligned rectangle containing the original box. With probability ``square_share`` (one
    more draw, made only when the share is > 0) the rectangle becomes a square: its shorter side grows to the longer
    one, centred, shifted inwards at an image border, and clipped only when the image itself is narrower. An empty
    segmentation has no box and gives an empty mask (nothing to generate) without drawing from `rng`.
    """
    u8 = _as_binary_u8(seg)
    _check_rng(rng)
    _check_range("expand", expand, low=0.0)
    if not 0.0 <= float(square_share) <= 1.0:
        raise ValueError(f"square_share={square_share!r} must be a probability in [0, 1]")
    out = np.zeros(u8.shape, dtype=np.float32)
    x, y, bw, bh = cv2.boundingRect(u8)
    if bw == 0 or bh == 0:
        return out
    left, right, top, bottom = rng.uniform(expand[0], expand[1], size=4)
    h, w = u8.shape
    x0 = max(0, x - int(round(left * bw)))
    x1 = min(w, x + bw + int(round(right * bw)))
    y0 = max(0, y - int(round(top * bh)))
    y1 = min(h, y + bh + int(round(bottom * bh)))
    if square_share > 0 and rng.random() < square_share:
        y0, y1 = _grow_to(y0, y1, max(y1 - y0, x1 - x0), h)
        x0, x1 = _grow_to(x0, x1, max(y1 - y0, x1 - x0), w)
    out[y0:y1, x0:x1] = 1.0
    return out


def _grow_to(start: int, end: int, size: int, limit: int) -> tuple[int, int]:
    """[start, end) grown to ``size`` (at most ``limit``) around its centre, shifted back inside [0, limit)."""
    size = min(size, limit)
    start -= (size - (end - start)) // 2
    start = min(max(0, start), limit - size)
    return start, start + size


def _pick_band(params: IrregularMaskParams, ratio: float) -> DilationBand:
    for band in params.dilation_bands:
        if ratio <= band.max_ratio:
            return band
    return params.dilation_bands[-1]


def _random_points(u8: np.ndarray, rng: np.random.Generator, count: int) -> np.ndarray:
    """`count` points (x, y) drawn uniformly from the non-zero pixels of a non-empty uint8 image.

    Rejection sampling inside the bounding box costs O(count) instead of the O(h*w) of listing every non-zero pixel,
    and is still exactly uniform; a very sparse box (a thin diagonal line) falls back to listing the pixels.
    """
    x, y, bw, bh = cv2.boundingRect(u8)
    found: list[np.ndarray] = []
    need = count
    for _ in range(4):
        batch = max(16, 4 * need)
        xs = rng.integers(x, x + bw, size=batch)
        ys = rng.integers(y, y + bh, size=batch)
        hit = u8[ys, xs] != 0
        pts = np.stack([xs[hit], ys[hit]], axis=1)[:need]
        found.append(pts)
        need -= len(pts)
        if need == 0:
            return np.concatenate(found)
    listed = cv2.findNonZero(u8).reshape(-1, 2)
    found.append(listed[rng.integers(0, len(listed), size=need)])
    return np.concatenate(found)


def dilate_rect(u8: np.ndarray, ksize: int, iterations: int) -> np.ndarray:
    """Exactly `cv2.dilate(u8, np.ones((ksize, ksize)), iterations=iterations)` for a {0, 1} uint8 image, in time
    linear in the image area whatever the kernel size.

    `iterations` dilations by a k-square with OpenCV's default anchor (k // 2) are one dilation by a square of side
    K = iterations * (k - 1) + 1 anchored at iterations * (k // 2); a square is a row then a column, and a 1-D
    dilation of a binary image is "the window sum is positive", which `cv2.boxFilter` computes with running sums.
    cv2.dilate instead costs area x kernel size (a minute at 8192x8192 with the node's largest dilation).
    """
    if ksize < 1 or iterations < 1:
        raise ValueError(f"dilate_rect needs ksize >= 1 and iterations >= 1, got {ksize}, {iterations}")
    before = iterations * (ksize // 2)
    after = iterations * (ksize - 1) - before

    def window(n: int) -> tuple[int, int]:
        # Reach beyond n - 1 pixels on either side covers the whole axis anyway: clip it, so the cost stays linear
        # in the area even for kernels larger than the image.
        b, a = min(before, n - 1), min(after, n - 1)
        return b + a + 1, b

    # Window sums saturate at 65535 in uint16, which keeps "positive" exact at half the memory of int32.
    size, anchor = window(u8.shape[1])
    rows = cv2.boxFilter(u8, cv2.CV_16U, (size, 1), anchor=(anchor, 0), normalize=False,
                         borderType=cv2.BORDER_CONSTANT)
    out = np.greater(rows, 0).view(np.uint8)
    del rows
    size, anchor = window(u8.shape[0])
    cols = cv2.boxFilter(out, cv2.CV_16U, (1, size), anchor=(0, anchor), normalize=False,
                         borderType=cv2.BORDER_CONSTANT)
    return np.greater(cols, 0).view(np.uint8)


def irregular_mask(seg: np.ndarray, rng: np.random.Generator,
                   params: IrregularMaskParams | None = None,
                   check_interrupt: Callable[[], None] | None = None) -> np.ndarray:
    """m_irr (Algorithm 1): dilate by coverage ratio, then scribble from random non-zero points.

    Steps: r = sum(m_seg) / (h*w) picks a `DilationBand`; a random kernel size and iteration count from that band
    dilate m_seg into m_d (so the result always contains the segmentation); if m_d is empty it is returned as is
    (an empty mask); otherwise a random number of drawings start at random non-zero points of m_d and chain random
    line / circle / square segments with random angle, length and brush width. See `IrregularMaskParams` for every
    number involved.

    The cost is bounded by the image, not by the parameters: each drawing op touches at most the image's area, and
    once the shapes drawn since the last look add up to the image's area the mask is checked for full coverage,
    after which no op is drawn (they could not change a pixel; the random draws go on, so the output and the rng's
    state are those of drawing everything). `check_interrupt` (ComfyUI's interrupt poll) is called before each op,
    so a 64 x 64-op scribble on an 8192² mask stops within one op.
    """
    u8 = _as_binary_u8(seg)
    _check_rng(rng)
    p = params if params is not None else IrregularMaskParams()
    if not isinstance(p, IrregularMaskParams):
        raise TypeError(f"params must be an IrregularMaskParams, got {type(p).__name__}")
    h, w = u8.shape
    short = min(h, w)

    # Steps 2-8: coverage ratio -> kernel and iterations -> dilation.
    ratio = cv2.countNonZero(u8) / float(h * w)
    band = _pick_band(p, ratio)
    kernel_frac = rng.uniform(band.kernel[0], band.kernel[1])
    iterations = int(rng.integers(band.iterations[0], band.iterations[1] + 1))
    ksize = max(1, int(round(kernel_frac * short * p.dilation_scale)))
    if ksize > 1 and ratio > 0:
        if p.kernel_shape == "rect":
            m_d = dilate_rect(u8, ksize, iterations)
        else:
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (ksize, ksize))
            m_d = cv2.dilate(u8, kernel, iterations=iterations)
    else:
        m_d = u8.copy()

    # Steps 9-13: nothing to start from -> the dilated (empty) mask.
    if ratio == 0:
        return _to_float(m_d)

    # Steps 14-22: drawings from random non-zero points of m_d, each a chain of random segments.
    n_strokes = int(rng.integers(p.strokes[0], p.strokes[1] + 1))
    if n_strokes == 0:
        return _to_float(m_d)
    starts = _random_points(m_d, rng, n_strokes)
    total = float(sum(p.shape_weights))
    line_max = p.shape_weights[0] / total
    circle_max = (p.shape_weights[0] + p.shape_weights[1]) / total
    area = float(h * w)
    drawn, full = 0.0, False
    for start in starts:
        n_seg = int(rng.integers(p.segments[0], p.segments[1] + 1))
        # One draw per segment for (shape, angle, length, width), all at once: Generator calls dominate otherwise.
        u = rng.random((n_seg, 4))
        cx, cy = float(start[0]), float(start[1])
        for shape_u, angle_u, length_u, width_u in u:
            angle = 2.0 * math.pi * angle_u
            length = (p.length[0] + (p.length[1] - p.length[0]) * length_u) * short
            width = max(1, int(round((p.width[0] + (p.width[1] - p.width[0]) * width_u) * short)))
            nx = min(max(cx + length * math.cos(angle), 0.0), w - 1.0)
            ny = min(max(cy + length * math.sin(angle), 0.0), h - 1.0)
            end = (int(round(nx)), int(round(ny)))
            if full:
                cx, cy = nx, ny
                continue
            if check_interrupt is not None:
                check_interrupt()
            if shape_u < line_max:
                cv2.line(m_d, (int(round(cx)), int(round(cy))), end, 1, thickness=width)
                drawn += min((length + width) * width, area)
            elif shape_u < circle_max:
                cv2.circle(m_d, end, width, 1, thickness=-1)
                drawn += min(math.pi * width * width, area)
            else:
                c, s = math.cos(angle) * width, math.sin(angle) * width
                corners = np.array([[nx + c - s, ny + s + c], [nx - c - s, ny - s + c],
                                    [nx - c + s, ny - s - c], [nx + c + s, ny + s - c]])
                cv2.fillConvexPoly(m_d, np.round(corners).astype(np.int32), 1)
                drawn += min(4.0 * width * width, area)
            if drawn >= area:  # one look per image's worth of drawing: at most doubles the work, never more
                full, drawn = cv2.countNonZero(m_d) == h * w, 0.0
            cx, cy = nx, ny
    return _to_float(m_d)


# ------------------------------------------------------------------------------------------------------ paper mix


def paper_kind(k: float) -> str:
    """Eq. 6: the mask kind for a draw k in [0, 1] (box if k <= 0.25, irregular if 0.25 < k <= 0.75, else seg)."""
    if k <= PAPER_BOX_MAX_K:
        return "box"
    if k <= PAPER_IRREGULAR_MAX_K:
        return "irregular"
    return "segmentation"


def paper_mix_mask(seg: np.ndarray, rng: np.random.Generator, *, box_expand: FloatRange = DEFAULT_BOX_EXPAND,
                   irregular: IrregularMaskParams | None = None,
                   square_share: float = PAPER_MIX_SQUARE_SHARE,
                   check_interrupt: Callable[[], None] | None = None) -> MixedMask:
    """Eq. 6: draw k ~ U[0, 1) from `rng`, build the kind it selects and return it together with that kind.

    Boxes are "rectangular or square" (§3.4): ``square_share`` of them are squares (:data:`PAPER_MIX_SQUARE_SHARE`).
    """
    _check_rng(rng)
    kind = paper_kind(float(rng.random()))
    if kind == "box":
        return MixedMask(box_mask(seg, rng, box_expand, square_share), kind)
    if kind == "irregular":
        return MixedMask(irregular_mask(seg, rng, irregular, check_interrupt), kind)
    return MixedMask(segmentation_mask(seg), kind)


_IRREGULAR_FIELDS = frozenset(f.name for f in dataclasses.fields(IrregularMaskParams))


def generate_mask(seg: np.ndarray, mode: str, rng: np.random.Generator, *,
                  check_interrupt: Callable[[], None] | None = None, **params: Any) -> np.ndarray:
    """One mask of `mode` ("segmentation", "box", "irregular", "paper_mix") from a 2-D segmentation.

    Keyword parameters: `box_expand` (box and paper_mix), `square_share` (box: default 0, paper_mix: default
    :data:`PAPER_MIX_SQUARE_SHARE`), `irregular` (an `IrregularMaskParams`) and/or any of its field names as
    overrides (irregular and paper_mix), e.g. ``generate_mask(seg, "irregular", rng, strokes=(2, 6))``.
    Parameters a mode does not use are accepted and ignored, so one parameter set can serve every mode.
    `check_interrupt` is polled inside the irregular scribble (see `irregular_mask`).
    """
    if mode not in MASK_MODES:
        raise ValueError(f"unknown mask mode {mode!r}; use one of {', '.join(MASK_MODES)}")
    _check_rng(rng)
    unknown = sorted(set(params) - _IRREGULAR_FIELDS - {"box_expand", "irregular", "square_share"})
    if unknown:
        raise ValueError(f"unknown mask parameter(s) {', '.join(unknown)}; use box_expand, square_share, irregular "
                         f"or one of {', '.join(sorted(_IRREGULAR_FIELDS))}")
    box_expand = params.pop("box_expand", DEFAULT_BOX_EXPAND)
    square_share = params.pop("square_share", PAPER_MIX_SQUARE_SHARE if mode == "paper_mix" else 0.0)
    irregular = params.pop("irregular", None) or IrregularMaskParams()
    if not isinstance(irregular, IrregularMaskParams):
        raise TypeError(f"irregular must be an IrregularMaskParams, got {type(irregular).__name__}")
    if params:
        irregular = dataclasses.replace(irregular, **params)
    if mode == "segmentation":
        return segmentation_mask(seg)
    if mode == "box":
        return box_mask(seg, rng, box_expand, square_share)
    if mode == "irregular":
        return irregular_mask(seg, rng, irregular, check_interrupt)
    return paper_mix_mask(seg, rng, box_expand=box_expand, irregular=irregular, square_share=square_share,
                          check_interrupt=check_interrupt).mask
