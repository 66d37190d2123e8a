"""painternet_core.shapes (the editor's boxes / strokes -> MASK) with exact pixels, and the PainterNetBoxMask node.

Pure core + a direct call of the node's function with ComfyUI's folder_paths pointed at a tmp temp folder; no server.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    # Appended, not prepended: the repo's `nodes` package must not shadow ComfyUI's `nodes` module for other tests.
    sys.path.append(str(ROOT))

from painternet_core import shapes  # noqa: E402
from painternet_core.shapes import Box, Stroke  # noqa: E402


def _rows(*lines: str) -> np.ndarray:
    """An expected mask written as rows of '.' (0) and '#' (1)."""
    return np.array([[1.0 if c == "#" else 0.0 for c in line] for line in lines], dtype=np.float32)


# ---------------------------------------------------------------- boxes


def test_box_covers_pixels_whose_centres_are_inside() -> None:
    mask = shapes.rasterize([Box(0.25, 0.25, 0.5, 0.5)], 8, 8)
    expected = np.zeros((8, 8), np.float32)
    expected[2:6, 2:6] = 1
    np.testing.assert_array_equal(mask, expected)
    assert mask.dtype == np.float32


def test_box_on_non_square_image_uses_width_for_x_and_height_for_y() -> None:
    # H=10, W=20: x 0.1..0.4 -> columns 2..7, y 0.2..0.7 -> rows 2..6.
    mask = shapes.rasterize([Box(0.1, 0.2, 0.3, 0.5)], 10, 20)
    expected = np.zeros((10, 20), np.float32)
    expected[2:7, 2:8] = 1
    np.testing.assert_array_equal(mask, expected)


def test_box_edges_round_half_up_so_adjacent_boxes_tile_exactly() -> None:
    # W=20: 0.125 * 20 = 2.5 -> column 3 (halves round up, not to even); 0.375 * 20 = 7.5 -> 8.
    left = shapes.rasterize([Box(0.125, 0.0, 0.25, 1.0)], 2, 20)
    assert np.flatnonzero(left[0]).tolist() == [3, 4, 5, 6, 7]
    right = shapes.rasterize([Box(0.375, 0.0, 0.25, 1.0)], 2, 20)
    assert np.flatnonzero(right[0]).tolist() == [8, 9, 10, 11, 12]
    assert not np.any(left * right)


def test_box_partly_outside_is_clipped() -> None:
    mask = shapes.rasterize([Box(-0.5, 0.75, 1.0, 0.5)], 8, 8)
    expected = np.zeros((8, 8), np.float32)
    expected[6:8, 0:4] = 1
    np.testing.assert_array_equal(mask, expected)


def test_box_fully_outside_or_thinner_than_half_a_pixel_draws_nothing() -> None:
    assert not shapes.rasterize([Box(1.2, 0.0, 0.5, 1.0)], 8, 8).any()
    assert not shapes.rasterize([Box(-0.9, -0.9, 0.5, 0.5)], 8, 8).any()
    assert not shapes.rasterize([Box(0.5, 0.5, 0.05, 0.5)], 8, 8).any()  # 0.4 px wide: no pixel centre inside
    assert shapes.box_pixels(Box(0.5, 0.5, 0.0, 0.0), 8, 8) is None


def test_whole_image_box() -> None:
    assert shapes.rasterize([Box(0.0, 0.0, 1.0, 1.0)], 5, 7).all()


# ---------------------------------------------------------------- strokes


def test_horizontal_stroke_has_odd_band_and_round_caps() -> None:
    # W=12, H=10, points at pixel centres (2, 5) and (8, 5); width 0.3 * 10 = 3 px -> radius 1, band rows 4..6,
    # caps reach one column past each end at the centre row.
    mask = shapes.rasterize([Stroke(((2.5 / 12, 5.5 / 10), (8.5 / 12, 5.5 / 10)), 0.3)], 10, 12)
    expected = _rows(
        "............",
        "............",
        "............",
        "............",
        "..#######...",
        ".#########..",
        "..#######...",
        "............",
        "............",
        "............",
    )
    np.testing.assert_array_equal(mask, expected)


def test_thin_stroke_is_one_pixel_diagonal() -> None:
    # Diameter 0.1 px: still drawn, one pixel wide, through the centres of (1,1)..(8,8).
    mask = shapes.rasterize([Stroke(((0.15, 0.15), (0.85, 0.85)), 0.01)], 10, 10)
    expected = np.zeros((10, 10), np.float32)
    idx = np.arange(1, 9)
    expected[idx, idx] = 1
    np.testing.assert_array_equal(mask, expected)


def test_one_point_stroke_is_a_dot() -> None:
    # Diameter 0.625 * 8 = 5 px -> radius 2 around pixel (4, 4): OpenCV's filled radius-2 circle.
    mask = shapes.rasterize([Stroke(((4.5 / 8, 4.5 / 8),), 0.625)], 8, 8)
    expected = _rows(
        "........",
        "........",
        "....#...",
        "...###..",
        "..#####.",
        "...###..",
        "....#...",
        "........",
    )
    np.testing.assert_array_equal(mask, expected)


def test_stroke_width_is_relative_to_the_short_side() -> None:
    # Same normalised width on 10x40 and 40x10 images: 0.5 * 10 = 5 px either way -> band 5 px.
    wide = shapes.rasterize([Stroke(((0.2, 0.55), (0.8, 0.55)), 0.5)], 10, 40)
    tall = shapes.rasterize([Stroke(((0.55, 0.2), (0.55, 0.8)), 0.5)], 40, 10)
    assert wide[:, 20].sum() == 5
    assert tall[20, :].sum() == 5
    np.testing.assert_array_equal(wide, tall.T)


def test_polyline_stroke_partly_outside_is_clipped() -> None:
    # An L from off-image left along row 1, then down column 5 and off the bottom; thickness 1.
    mask = shapes.rasterize([Stroke(((-0.5, 0.15), (0.55, 0.15), (0.55, 1.5)), 0.1)], 10, 10)
    expected = np.zeros((10, 10), np.float32)
    expected[1, 0:6] = 1
    expected[1:, 5] = 1
    np.testing.assert_array_equal(mask, expected)


def test_stroke_radius_rule() -> None:
    # Diameter d = width * short side is drawn 2r + 1 px wide with r = round((d - 1) / 2), halves up.
    for diameter, radius in [(0.2, 0), (1.0, 0), (2.0, 1), (3.0, 1), (4.0, 2), (5.0, 2), (10.0, 5)]:
        assert shapes.stroke_radius(Stroke(((0.5, 0.5),), diameter / 100), 100, 300) == radius, diameter


def test_boxes_and_strokes_union() -> None:
    mask = shapes.rasterize([Box(0.0, 0.0, 0.5, 0.5), Stroke(((0.75, 0.75),), 0.05)], 4, 4)
    expected = _rows("##..", "##..", "....", "...#")
    np.testing.assert_array_equal(mask, expected)


# ---------------------------------------------------------------- JSON and render_mask


def test_empty_shapes_give_empty_mask() -> None:
    for text in ("", "   ", shapes.EMPTY_SHAPES_JSON, "[]"):
        mask = shapes.render_mask(text, 6, 9)
        assert mask.shape == (6, 9) and mask.dtype == np.float32 and not mask.any()
    assert shapes.render_mask("", 6, 9, invert=True).all()


def test_render_mask_parses_editor_json_and_inverts() -> None:
    text = json.dumps({"version": 1, "shapes": [{"type": "box", "x": 0.25, "y": 0.25, "w": 0.5, "h": 0.5}]})
    mask = shapes.render_mask(text, 8, 8)
    assert mask[2:6, 2:6].all() and mask.sum() == 16
    np.testing.assert_array_equal(shapes.render_mask(text, 8, 8, invert=True), 1 - mask)


def test_json_round_trip_and_bare_list() -> None:
    drawn = [Box(0.1, 0.2, 0.3, 0.4), Stroke(((0.1, 0.9), (0.5, 0.5), (0.9, 0.1)), 0.05), Stroke(((0.5, 0.5),), 1.0)]
    text = shapes.shapes_to_json(drawn)
    assert shapes.parse_shapes(text) == drawn
    assert shapes.parse_shapes(json.dumps(json.loads(text)["shapes"])) == drawn


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ('{"version": 2, "shapes": []}', "version 2 is not supported"),
    ('{"shapes": [], "colour": 1}', "unknown top-level key(s) ['colour']"),
    ('{"version": 1}', "no 'shapes' list"),
    ('{"shapes": {"type": "box"}}', "must be a list"),
    ('"box"', "must be a list"),
    ('[1]', "shape 0 must be an object"),
    ('[{"type": "circle"}]', "unknown type 'circle'"),
    ('[{"type": "box", "x": 0, "y": 0, "w": 1}]', "missing key(s) ['h']"),
    ('[{"type": "box", "x": 0, "y": 0, "w": 1, "h": 1, "id": 3}]', "unknown key(s) ['id']"),
    ('[{"type": "box", "x": 0.1, "y": 0, "w": -0.2, "h": 1}]', "must not be negative"),
    ('[{"type": "box", "x": 120, "y": 0, "w": 1, "h": 1}]', "x=120.0 is outside [-1.0, 2.0]"),
    ('[{"type": "box", "x": "0.1", "y": 0, "w": 1, "h": 1}]', "x must be a number, got '0.1'"),
    ('[{"type": "box", "x": true, "y": 0, "w": 1, "h": 1}]', "x must be a number"),
    ('[{"type": "box", "x": NaN, "y": 0, "w": 1, "h": 1}]', "x must be finite"),
    ('[{"type": "stroke", "width": 0, "points": [[0, 0]]}]', "width=0.0 must be in (0, 1]"),
    ('[{"type": "stroke", "width": 0.1, "points": []}]', "non-empty list"),
    ('[{"type": "stroke", "width": 0.1, "points": [[0, 0, 0]]}]', "points[0] must be an [x, y] pair"),
    ('[{"type": "box", "x": 0, "y": 0, "w": 1, "h": 1}, {"type": "stroke", "width": 0.1, "points": [[0, 5]]}]',
     "shape 1: points[0][1]=5.0 is outside"),
])
def test_bad_json_raises_clear_value_error(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        shapes.parse_shapes(text)
    assert message in str(info.value)


def test_limits_and_sizes() -> None:
    too_many = json.dumps([{"type": "box", "x": 0, "y": 0, "w": 0.1, "h": 0.1}] * (shapes.MAX_SHAPES + 1))
    with pytest.raises(ValueError, match="more than 4096"):
        shapes.parse_shapes(too_many)
    with pytest.raises(ValueError, match="must be at least 1x1"):
        shapes.rasterize([], 0, 5)
    with pytest.raises(ValueError, match="must be a JSON string"):
        shapes.parse_shapes(None)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the node


def _load_box_mask_nodes():
    """nodes/box_mask_nodes.py as ComfyUI loads it (`nodes` may be ComfyUI's module in this process)."""
    from harness.comfy_helpers import pack_module

    return pack_module("nodes.box_mask_nodes")


def test_node_inputs_have_tooltips_and_category() -> None:
    node_cls = _load_box_mask_nodes().PainterNetBoxMask
    assert node_cls.CATEGORY == "inpaint/PainterNet"
    spec = node_cls.INPUT_TYPES()
    assert set(spec["required"]) == {"image", "shapes", "invert"}
    for name, (_, options) in spec["required"].items():
        assert options.get("tooltip"), name
    assert spec["required"]["shapes"][1]["default"] == shapes.EMPTY_SHAPES_JSON


def test_node_returns_batched_mask_and_temp_preview(tmp_path: Path) -> None:
    import folder_paths

    module = _load_box_mask_nodes()
    previous = folder_paths.get_temp_directory()
    folder_paths.set_temp_directory(str(tmp_path))
    try:
        image = torch.rand(2, 10, 20, 3)
        text = shapes.shapes_to_json([Box(0.1, 0.2, 0.3, 0.5)])
        out = module.PainterNetBoxMask.execute(image, text, False)
    finally:
        folder_paths.set_temp_directory(previous)
    (mask,) = out.result
    assert mask.shape == (2, 10, 20) and mask.dtype == torch.float32
    expected = torch.zeros(10, 20)
    expected[2:7, 2:8] = 1
    assert torch.equal(mask[0], expected) and torch.equal(mask[1], expected)
    (preview,) = out.ui["images"]
    assert preview["type"] == "temp" and preview["filename"].endswith(".png")
    saved = tmp_path / preview["subfolder"] / preview["filename"]
    assert saved.is_file()
    from PIL import Image

    with Image.open(saved) as img:
        assert img.size == (20, 10)
        pixels = np.asarray(img, dtype=np.float32) / 255.0
    np.testing.assert_allclose(pixels, image[0].numpy(), atol=1 / 255 + 1e-6)


def test_node_rejects_non_image_and_bad_shapes() -> None:
    node = _load_box_mask_nodes().PainterNetBoxMask
    with pytest.raises(ValueError, match="PainterNetBoxMask: image must be an IMAGE tensor"):
        node.execute(torch.zeros(10, 20), "", False)
    with pytest.raises(ValueError, match=r"PainterNetBoxMask: image batch is empty \(shape \(0, 4, 4, 3\)\)"):
        node.execute(torch.zeros(0, 4, 4, 3), "", False)
    with pytest.raises(ValueError, match="PainterNetBoxMask: image has 5 channels .* expected 1, 3 or 4"):
        node.execute(torch.zeros(1, 4, 4, 5), "", False)
    with pytest.raises(ValueError, match="not valid JSON"):
        node.execute(torch.zeros(1, 4, 4, 3), "{", False)
