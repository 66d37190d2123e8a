"""Boxes and scribbles drawn in the ComfyUI editor (web/painternet.js), parsed and rasterised into a MASK.

The editor stores what the user drew as JSON in the `shapes` widget of `PainterNetBoxMask`, so the drawing is saved
with the workflow and sent with the prompt like any other widget value. Everything is **normalised** to the image,
because the editor draws on a preview whose pixel size has nothing to do with the image the prompt will feed in (and
the same workflow may later run on another image)::

    {"version": 1, "shapes": [
        {"type": "box", "x": 0.25, "y": 0.10, "w": 0.40, "h": 0.30},
        {"type": "stroke", "width": 0.05, "points": [[0.10, 0.80], [0.30, 0.75], [0.50, 0.82]]}
    ]}

* box: top-left corner ``(x, y)`` and size ``(w, h)`` as fractions of the image width (x, w) and height (y, h).
* stroke: a polyline of ``[x, y]`` points (fractions of width / height) and a brush ``width`` as a fraction of the
  image's **short side**, so a brush looks equally thick on a portrait and a landscape image. Round caps and joins,
  like the editor's canvas (`lineCap = lineJoin = "round"`).

A bare list of shapes and an empty string (no shapes) are accepted too. Coordinates may lie a little outside the image
(the part outside is clipped); values far outside [-1, 2] are refused because they are almost always pixel values
written where fractions were expected.

Geometry conventions, chosen so a shape covers the pixels the editor shows it covering:

* the image spans ``[0, W] x [0, H]`` in continuous coordinates; pixel ``(i, j)`` is the unit square with its centre
  at ``(j + 0.5, i + 0.5)``;
* a box covers the pixels whose centres lie inside it: columns ``floor(x*W + 0.5) .. floor((x+w)*W + 0.5) - 1``
  (halves round up, so two boxes that share an edge neither overlap nor leave a gap);
* a stroke point ``(x, y)`` sits at ``(x*W - 0.5, y*H - 0.5)`` in OpenCV's pixel-centre coordinates, kept to 1/16 px
  with `cv2.polylines`' `shift`. OpenCV draws thick polylines as filled quads plus filled circles at every vertex,
  i.e. round caps and joins (a one-point stroke is a round dot), but its band is wider than the `thickness` asked
  for and always an odd number of pixels across: thickness ``t`` covers ``2*ceil(t/2) + 1`` px. So the brush
  diameter ``d = width * min(H, W)`` is drawn as the nearest odd width ``2r + 1`` with ``r = round((d - 1) / 2)``,
  passing ``t = 2r`` (``t = 1``, a one-pixel line, when ``r = 0``); the caps then have radius ``r`` too. Every stroke
  is at least one pixel wide, however thin its brush.

Output follows DESIGN.md §2: float32 (H, W) in {0, 1}, 1 = inside a shape = region to generate.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import cv2
import numpy as np

from .errors import quote

FORMAT_VERSION = 1
EMPTY_SHAPES_JSON = json.dumps({"version": FORMAT_VERSION, "shapes": []})

# Guards against pasted garbage (a shared workflow is untrusted input) that would take minutes to parse or draw, or
# overflow OpenCV's fixed-point coordinates; far above anything a person draws by hand (a long scribble at 60 pointer
# events per second is a few thousand points, ~20 bytes each in the JSON).
MAX_SHAPES = 4096
MAX_POINTS_PER_STROKE = 100_000
MAX_TOTAL_POINTS = 100_000
MAX_JSON_CHARS = 4 * 2**20
# Drawing cost, counted in OpenCV's units of work (see `raster_work`): at most this many units per output pixel, or
# `RASTER_WORK_FLOOR` on small images. Measured on the 2-vCPU AMD EPYC VM, a unit of non-trivial work costs at most
# ~12 ns, so any accepted document draws in about 1 s at 2048x2048 (time grows with the area only), while a
# hand-drawn one (thousands of points, even with the editor's widest brush) stays far below the bound; drawing is
# also interruptible between chunks of `RASTER_CHUNK_WORK` units.
RASTER_WORK_PER_PIXEL = 16
RASTER_WORK_FLOOR = 2**24
RASTER_CHUNK_WORK = 2**20
# A filled span costs about as much as this many pixels written inside it (OpenCV fills rows with memset), and a
# segment's fixed set-up about as much as this many spans.
_PIXELS_PER_ROW_COST = 256
_SEGMENT_COST = 16
COORD_RANGE: tuple[float, float] = (-1.0, 2.0)
# Fractional bits of the stroke coordinates handed to OpenCV (1/16 px), OpenCV's own maximum precision for drawing.
STROKE_SHIFT = 4

_BOX_KEYS = frozenset({"type", "x", "y", "w", "h"})
_STROKE_KEYS = frozenset({"type", "points", "width"})


@dataclass(frozen=True)
class Box:
    """An axis-aligned box: top-left corner (x, y) and size (w, h), fractions of the image width / height."""

    x: float
    y: float
    w: float
    h: float


@dataclass(frozen=True)
class Stroke:
    """A brush stroke: polyline points (x, y) as fractions of width / height; `width` a fraction of the short side."""

    points: tuple[tuple[float, float], ...]
    width: float


Shape = Union[Box, Stroke]


def _number(value: Any, where: str, name: str) -> float:
    """A finite JSON number (bools are refused: JSON `true` is not a coordinate)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {name} must be a number, got {quote(value)}")
    try:
        result = float(value)
    except OverflowError:
        result = math.inf
    if not math.isfinite(result):
        raise ValueError(f"{where}: {name} must be finite, got {quote(value)}")
    return result


def _coordinate(value: Any, where: str, name: str) -> float:
    result = _number(value, where, name)
    lo, hi = COORD_RANGE
    if not lo <= result <= hi:
        raise ValueError(f"{where}: {name}={result} is outside [{lo}, {hi}]; coordinates are fractions of the image "
                         "size (0..1), not pixels: divide pixel values by the image width / height")
    return result


def _check_keys(item: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(set(item) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {quote(unknown)}; a {item['type']} has only {sorted(allowed)}")
    missing = sorted(allowed - set(item))
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; a {item['type']} needs {sorted(allowed)}")


def _parse_box(item: dict[str, Any], where: str) -> Box:
    _check_keys(item, _BOX_KEYS, where)
    x, y = _coordinate(item["x"], where, "x"), _coordinate(item["y"], where, "y")
    w, h = _coordinate(item["w"], where, "w"), _coordinate(item["h"], where, "h")
    if w < 0 or h < 0:
        raise ValueError(f"{where}: box size w={w}, h={h} must not be negative; store the top-left corner as (x, y) "
                         "and the size as positive w, h")
    return Box(x, y, w, h)


def _parse_stroke(item: dict[str, Any], where: str, budget: int) -> Stroke:
    _check_keys(item, _STROKE_KEYS, where)
    width = _number(item["width"], where, "width")
    if not 0.0 < width <= 1.0:
        raise ValueError(f"{where}: width={width} must be in (0, 1]: it is the brush diameter as a fraction of the "
                         "image's short side (0.05 = 5 %)")
    raw = item["points"]
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{where}: points must be a non-empty list of [x, y] pairs, got {quote(raw)}")
    if len(raw) > MAX_POINTS_PER_STROKE:
        raise ValueError(f"{where}: {len(raw)} points is more than {MAX_POINTS_PER_STROKE}; simplify the stroke or "
                         "split it")
    if len(raw) > budget:
        raise ValueError(f"{where}: the strokes hold more than {MAX_TOTAL_POINTS} points in all; simplify or clear "
                         "some strokes")
    points = []
    for k, point in enumerate(raw):
        if not isinstance(point, list) or len(point) != 2:
            raise ValueError(f"{where}: points[{k}] must be an [x, y] pair, got {quote(point)}")
        points.append((_coordinate(point[0], where, f"points[{k}][0]"),
                       _coordinate(point[1], where, f"points[{k}][1]")))
    return Stroke(tuple(points), width)


def parse_shapes(text: str) -> list[Shape]:
    """Parse and validate the editor's JSON (see the module docstring); '' means no shapes.

    Every error is a ValueError naming the shape index, the bad value and what is expected, because the text may have
    been edited by hand or produced by another tool through the API.
    """
    if not isinstance(text, str):
        raise ValueError(f"shapes must be a JSON string, got {type(text).__name__}")
    if len(text) > MAX_JSON_CHARS:
        raise ValueError(f"shapes is {len(text)} characters, more than {MAX_JSON_CHARS}; a hand-drawn mask is far "
                         "smaller: clear the shapes or use a MASK from another node")
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"shapes is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): "
                         f"{quote(text[:80])}; expected {EMPTY_SHAPES_JSON} with box / stroke objects") from None
    except (ValueError, RecursionError) as exc:
        # json raises plain ValueError for integers beyond Python's digit limit and RecursionError for deep nesting.
        raise ValueError(f"shapes is not usable JSON ({quote(str(exc), 120)}); expected {EMPTY_SHAPES_JSON} with "
                         "box / stroke objects") from None
    if isinstance(data, dict):
        version = data.get("version", FORMAT_VERSION)
        if isinstance(version, bool) or version != FORMAT_VERSION:
            raise ValueError(f"shapes version {quote(version)} is not supported; this PainterNet reads version "
                             f"{FORMAT_VERSION}: update the pack or redraw the shapes")
        unknown = sorted(set(data) - {"version", "shapes"})
        if unknown:
            raise ValueError(f"unknown top-level key(s) {quote(unknown)} in shapes; expected only 'version' and "
                             "'shapes'")
        if "shapes" not in data:
            raise ValueError(f"shapes JSON has no 'shapes' list; expected {EMPTY_SHAPES_JSON}")
        items = data["shapes"]
    else:
        items = data
    if not isinstance(items, list):
        raise ValueError(f"'shapes' must be a list of box / stroke objects, got {type(items).__name__}")
    if len(items) > MAX_SHAPES:
        raise ValueError(f"{len(items)} shapes is more than {MAX_SHAPES}; clear some or merge them")
    shapes: list[Shape] = []
    points_left = MAX_TOTAL_POINTS
    for i, item in enumerate(items):
        where = f"shape {i}"
        if not isinstance(item, dict):
            raise ValueError(f"{where} must be an object with a 'type', got {quote(item)}")
        kind = item.get("type")
        if kind == "box":
            shapes.append(_parse_box(item, where))
        elif kind == "stroke":
            stroke = _parse_stroke(item, where, points_left)
            points_left -= len(stroke.points)
            shapes.append(stroke)
        else:
            raise ValueError(f"{where}: unknown type {quote(kind)}; use 'box' or 'stroke'")
    return shapes


def shapes_to_json(shapes: list[Shape]) -> str:
    """The canonical JSON the editor writes (parse_shapes(shapes_to_json(s)) == s)."""
    out: list[dict[str, Any]] = []
    for shape in shapes:
        if isinstance(shape, Box):
            out.append({"type": "box", "x": shape.x, "y": shape.y, "w": shape.w, "h": shape.h})
        else:
            out.append({"type": "stroke", "width": shape.width, "points": [list(p) for p in shape.points]})
    return json.dumps({"version": FORMAT_VERSION, "shapes": out})


def _round_half_up(value: float) -> int:
    # Python's round() rounds halves to even, which would make adjacent boxes overlap or leave gaps at odd sizes.
    return math.floor(value + 0.5)


def box_pixels(box: Box, height: int, width: int) -> tuple[int, int, int, int] | None:
    """Pixel rows [top, bottom) and columns [left, right) a box covers after clipping; None when it covers none."""
    left = min(max(_round_half_up(box.x * width), 0), width)
    right = min(max(_round_half_up((box.x + box.w) * width), 0), width)
    top = min(max(_round_half_up(box.y * height), 0), height)
    bottom = min(max(_round_half_up((box.y + box.h) * height), 0), height)
    if right <= left or bottom <= top:
        return None
    return top, bottom, left, right


def stroke_radius(stroke: Stroke, height: int, width: int) -> int:
    """Half-width r of the drawn brush in px: it covers 2r + 1 px across, the odd width nearest its diameter."""
    diameter = stroke.width * min(height, width)
    return max(0, _round_half_up((diameter - 1.0) / 2.0))


def _cv_thickness(radius: int) -> int:
    # OpenCV widens a band of thickness t to 2*ceil(t/2) + 1 px; an even t = 2r gives exactly 2r + 1 (module doc).
    return 1 if radius == 0 else 2 * radius


def _stroke_vertices(stroke: Stroke, height: int, width: int) -> np.ndarray:
    """The stroke's vertices in OpenCV's fixed-point pixel-centre coordinates, (N, 2) int32, N >= 2.

    Consecutive vertices that land on the same fixed-point position are merged: a zero-length segment only redraws
    the round cap already there, so dropping it changes no pixel and saves its cost.
    """
    points = np.asarray(stroke.points, dtype=np.float64)
    centres = np.empty_like(points)
    centres[:, 0] = points[:, 0] * width - 0.5
    centres[:, 1] = points[:, 1] * height - 0.5
    fixed = np.floor(centres * (1 << STROKE_SHIFT) + 0.5).astype(np.int32)
    if len(fixed) > 1:
        keep = np.ones(len(fixed), dtype=bool)
        keep[1:] = np.any(fixed[1:] != fixed[:-1], axis=1)
        fixed = fixed[keep]
    if len(fixed) == 1:
        # polylines draws nothing for a single vertex; a repeated vertex draws its round cap, i.e. a dot.
        fixed = np.concatenate([fixed, fixed])
    return fixed


def _segment_work(fixed: np.ndarray, radius: int) -> np.ndarray:
    """Work units of each segment of a fixed-point polyline: rows OpenCV scans plus pixels it fills / 256.

    A one-pixel line (radius 0) is drawn pixel by pixel (Bresenham): one unit per pixel. A thick segment is a filled
    quad plus a filled disc at each end: one unit per scanline, and memset-speed pixels. Each segment also pays a
    fixed set-up cost.
    """
    delta = np.abs(np.diff(fixed.astype(np.float64), axis=0)) / (1 << STROKE_SHIFT)
    if radius == 0:
        return np.maximum(delta[:, 0], delta[:, 1]) + 1.0 + _SEGMENT_COST
    band = 2.0 * radius + 1.0
    length = np.hypot(delta[:, 0], delta[:, 1])
    rows = delta[:, 1] + 3.0 * band
    pixels = (length + 1.0) * band + 2.0 * band * band
    return rows + pixels / _PIXELS_PER_ROW_COST + _SEGMENT_COST


def raster_work(shapes: list[Shape], height: int, width: int) -> int:
    """The work `rasterize` would do for these shapes at (height, width), in the units `RASTER_WORK_PER_PIXEL`
    bounds: for a box one unit per row plus its pixels / 256; for a stroke see `_segment_work`."""
    total = 0.0
    for shape in shapes:
        if isinstance(shape, Box):
            pixels = box_pixels(shape, height, width)
            if pixels is not None:
                top, bottom, left, right = pixels
                total += (bottom - top) * (1.0 + (right - left) / _PIXELS_PER_ROW_COST)
        else:
            total += float(_segment_work(_stroke_vertices(shape, height, width),
                                         stroke_radius(shape, height, width)).sum())
    return int(math.ceil(total))


def raster_budget(height: int, width: int) -> int:
    """The most work `rasterize` accepts at this size: linear in the output area."""
    return max(RASTER_WORK_PER_PIXEL * height * width, RASTER_WORK_FLOOR)


def rasterize(shapes: list[Shape], height: int, width: int,
              check_interrupt: Optional[Callable[[], None]] = None) -> np.ndarray:
    """Draw the shapes into a float32 (height, width) mask, 1 inside any shape; parts outside the image are clipped.

    Refuses (ValueError) a drawing whose `raster_work` exceeds `raster_budget`, so time is bounded by a multiple of
    the output area whatever the document holds. `check_interrupt` (e.g. ComfyUI's interrupt poll, which raises) is
    called between chunks of about `RASTER_CHUNK_WORK` units; splitting a polyline at a vertex draws the same pixels,
    because every segment draws its own round caps.
    """
    if height < 1 or width < 1:
        raise ValueError(f"mask size {height}x{width} must be at least 1x1; check the image that feeds the node")
    work, budget = raster_work(shapes, height, width), raster_budget(height, width)
    if work > budget:
        raise ValueError(f"the shapes would take {work} units of drawing work at {width}x{height}, more than the "
                         f"{budget} allowed (about {RASTER_WORK_PER_PIXEL} per pixel): use fewer points, fewer or "
                         "thinner strokes, or fewer boxes")
    canvas = np.zeros((height, width), dtype=np.uint8)
    for shape in shapes:
        if check_interrupt is not None:
            check_interrupt()
        if isinstance(shape, Box):
            pixels = box_pixels(shape, height, width)
            if pixels is not None:
                top, bottom, left, right = pixels
                # cv2.rectangle's corners are inclusive pixel indices; thickness -1 fills.
                cv2.rectangle(canvas, (left, top), (right - 1, bottom - 1), 255, thickness=-1)
            continue
        radius = stroke_radius(shape, height, width)
        thickness = _cv_thickness(radius)
        fixed = _stroke_vertices(shape, height, width)
        cost = np.cumsum(_segment_work(fixed, radius))
        start = 0
        while start < len(fixed) - 1:
            # Segments start..stop-1, i.e. vertices start..stop, make one chunk of about RASTER_CHUNK_WORK units.
            base = cost[start - 1] if start else 0.0
            stop = int(np.searchsorted(cost, base + RASTER_CHUNK_WORK, side="right")) + 1
            stop = min(max(stop, start + 1), len(fixed) - 1)
            cv2.polylines(canvas, [fixed[start:stop + 1].reshape(-1, 1, 2)], isClosed=False, color=255,
                          thickness=thickness, lineType=cv2.LINE_8, shift=STROKE_SHIFT)
            start = stop
            if check_interrupt is not None and start < len(fixed) - 1:
                check_interrupt()
    return (canvas > 0).astype(np.float32)


def render_mask(text: str, height: int, width: int, invert: bool = False,
                check_interrupt: Optional[Callable[[], None]] = None) -> np.ndarray:
    """Parse the editor's JSON and rasterise it at (height, width); `invert` gives 1 outside the shapes instead."""
    mask = rasterize(parse_shapes(text), int(height), int(width), check_interrupt)
    return 1.0 - mask if invert else mask
