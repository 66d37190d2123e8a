"""Properties of the paper's masks (painternet_core.masks) and of the PainterNetMaskGenerator node function.

Pure core + a direct call of the node's function (the node polls ComfyUI's interrupt flag between items).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    # Appended, not prepended: the repo's `nodes` package must not shadow ComfyUI's `nodes` module for other tests.
    sys.path.append(str(ROOT))

from painternet_core import masks  # noqa: E402

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _load_mask_nodes():
    """nodes/mask_nodes.py as ComfyUI loads it (`nodes` may be ComfyUI's module in this process)."""
    from harness.comfy_helpers import pack_module

    return pack_module("nodes.mask_nodes")


@st.composite
def segmentations(draw, min_side: int = 1, max_side: int = 48, allow_empty: bool = True):
    """Random (H, W) {0,1} float32 masks: empty, full, random rectangles and random sparse pixels, odd sizes too."""
    h = draw(st.integers(min_side, max_side))
    w = draw(st.integers(min_side, max_side))
    kind = draw(st.sampled_from(["rects", "pixels", "full"] + (["empty"] if allow_empty else [])))
    seg = np.zeros((h, w), dtype=np.float32)
    if kind == "full":
        seg[:] = 1
    elif kind == "rects":
        for _ in range(draw(st.integers(1, 3))):
            y0, x0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
            y1, x1 = draw(st.integers(y0 + 1, h)), draw(st.integers(x0 + 1, w))
            seg[y0:y1, x0:x1] = 1
    elif kind == "pixels":
        ys = draw(st.lists(st.integers(0, h - 1), min_size=1, max_size=6))
        xs = draw(st.lists(st.integers(0, w - 1), min_size=len(ys), max_size=len(ys)))
        seg[ys, xs] = 1
    return seg


def _bbox(seg: np.ndarray) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(seg)
    if len(ys) == 0:
        return None
    return int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())


def _assert_binary_like(out: np.ndarray, seg: np.ndarray) -> None:
    assert out.dtype == np.float32
    assert out.shape == seg.shape
    assert np.isin(out, (0.0, 1.0)).all()


seeds = st.integers(0, 2**63 - 1)


# ---------------------------------------------------------------------------------------------------- properties


@FAST
@given(seg=segmentations())
def test_segmentation_mode_returns_the_input(seg):
    out = masks.generate_mask(seg, "segmentation", np.random.default_rng(0))
    _assert_binary_like(out, seg)
    np.testing.assert_array_equal(out, seg)
    assert out is not seg and not np.shares_memory(out, seg)


@FAST
@given(seg=segmentations(), seed=seeds)
def test_box_is_one_rectangle_containing_the_bounding_box(seg, seed):
    out = masks.box_mask(seg, np.random.default_rng(seed))
    _assert_binary_like(out, seg)
    box = _bbox(seg)
    if box is None:
        assert not out.any()
        return
    got = _bbox(out)
    assert got is not None
    y0, y1, x0, x1 = got
    # exactly one axis-aligned rectangle: everything inside its bounding box is 1, nothing outside.
    assert out[y0:y1 + 1, x0:x1 + 1].all()
    assert out.sum() == (y1 - y0 + 1) * (x1 - x0 + 1)
    by0, by1, bx0, bx1 = box
    assert y0 <= by0 and y1 >= by1 and x0 <= bx0 and x1 >= bx1


@FAST
@given(seg=segmentations(), seed=seeds, expand=st.tuples(st.floats(0, 1), st.floats(0, 1)).map(sorted))
def test_box_expansion_stays_within_range(seg, seed, expand):
    lo, hi = expand
    out = masks.box_mask(seg, np.random.default_rng(seed), expand=(lo, hi))
    box = _bbox(seg)
    if box is None:
        assert not out.any()
        return
    by0, by1, bx0, bx1 = box
    bh, bw = by1 - by0 + 1, bx1 - bx0 + 1
    y0, y1, x0, x1 = _bbox(out)
    h, w = seg.shape
    for grown, size, limit in ((by0 - y0, bh, by0), (y1 - by1, bh, h - 1 - by1),
                               (bx0 - x0, bw, bx0), (x1 - bx1, bw, w - 1 - bx1)):
        assert grown <= round(hi * size) + 1
        assert grown >= min(limit, round(lo * size) - 1)


@FAST
@given(seg=segmentations(), seed=seeds)
def test_irregular_contains_the_segmentation(seg, seed):
    out = masks.irregular_mask(seg, np.random.default_rng(seed))
    _assert_binary_like(out, seg)
    assert (out >= seg).all()
    if not seg.any():
        assert not out.any()


@FAST
@given(seg=segmentations(), seed=seeds, mode=st.sampled_from(masks.MASK_MODES))
def test_same_seed_same_mask(seg, seed, mode):
    a = masks.generate_mask(seg, mode, np.random.default_rng(seed))
    b = masks.generate_mask(seg, mode, np.random.default_rng(seed))
    _assert_binary_like(a, seg)
    np.testing.assert_array_equal(a, b)


@FAST
@given(seg=segmentations(), seed=seeds)
def test_paper_mix_is_one_of_the_three_kinds(seg, seed):
    mixed = masks.paper_mix_mask(seg, np.random.default_rng(seed))
    assert mixed.kind in masks.MASK_KINDS
    replay = np.random.default_rng(seed)
    replay.random()  # the k of Eq. 6
    expected = masks.generate_mask(seg, mixed.kind, replay, square_share=masks.PAPER_MIX_SQUARE_SHARE)
    np.testing.assert_array_equal(mixed.mask, expected)


@FAST
@given(seg=segmentations(), seed=seeds)
def test_square_box_is_a_square_containing_the_box_when_the_image_allows(seg, seed):
    out = masks.box_mask(seg, np.random.default_rng(seed), square_share=1.0)
    rectangle = masks.box_mask(seg, np.random.default_rng(seed))
    _assert_binary_like(out, seg)
    if _bbox(seg) is None:
        assert not out.any()
        return
    y0, y1, x0, x1 = _bbox(out)
    assert out.sum() == (y1 - y0 + 1) * (x1 - x0 + 1)  # one rectangle
    assert (out >= rectangle).all()  # it contains the rectangular box drawn from the same generator
    h, w = seg.shape
    side = max(_bbox(rectangle)[1] - _bbox(rectangle)[0], _bbox(rectangle)[3] - _bbox(rectangle)[2]) + 1
    assert (y1 - y0 + 1, x1 - x0 + 1) == (min(side, h), min(side, w))


def test_paper_mix_boxes_are_rectangular_or_square_in_the_documented_share():
    seg = np.zeros((64, 96), np.float32)
    seg[20:30, 10:50] = 1  # a wide object: its plain box is never square
    rng = np.random.default_rng(0)
    shapes = []
    for _ in range(800):
        mixed = masks.paper_mix_mask(seg, rng)
        if mixed.kind == "box":
            y0, y1, x0, x1 = _bbox(mixed.mask)
            shapes.append(y1 - y0 == x1 - x0)
    assert len(shapes) > 150 and abs(np.mean(shapes) - masks.PAPER_MIX_SQUARE_SHARE) < 0.1
    for s in range(20):  # a plain box stays rectangular
        y0, y1, x0, x1 = _bbox(masks.box_mask(seg, np.random.default_rng(s)))
        assert y1 - y0 < x1 - x0
    with pytest.raises(ValueError, match="square_share"):
        masks.box_mask(seg, rng, square_share=1.5)


@pytest.mark.parametrize("shape, rows, cols, square_rows, square_cols", [
    ((64, 96), (20, 30), (10, 51), (5, 46), (10, 51)),  # grown around its centre: 31 more rows, 15 above
    ((64, 96), (5, 56), (40, 50), (5, 56), (20, 71)),  # a tall box grows sideways, 20 px left
    ((64, 96), (2, 12), (10, 51), (0, 41), (10, 51)),  # at the top border: shifted down, not cut
    ((64, 96), (55, 64), (10, 51), (23, 64), (10, 51)),  # at the bottom border: shifted up, not cut
    ((30, 96), (10, 20), (10, 51), (0, 30), (10, 51)),  # the image is lower than the side: clipped to it
])
def test_square_box_is_centred_on_the_box_and_shifted_inside_the_image(shape, rows, cols, square_rows, square_cols):
    seg = np.zeros(shape, np.float32)
    seg[rows[0]:rows[1], cols[0]:cols[1]] = 1
    expected = np.zeros(shape, np.float32)
    expected[square_rows[0]:square_rows[1], square_cols[0]:square_cols[1]] = 1
    out = masks.box_mask(seg, np.random.default_rng(0), expand=(0.0, 0.0), square_share=1.0)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("square_share, draws", [(0.0, 4), (0.5, 5), (1.0, 5)])
def test_box_draws_the_square_choice_only_when_squares_are_possible(square_share, draws):
    """A trainer shares one generator across samples: a box of share 0 takes exactly its four expansions from it."""
    rng = np.random.default_rng(11)
    masks.box_mask(_object(32, 32), rng, square_share=square_share)
    reference = np.random.default_rng(11)
    reference.random(draws)
    assert rng.random() == reference.random()


def test_box_is_square_exactly_when_the_draw_is_below_the_share():
    """P(u < share) = share for u ~ U[0, 1): a draw equal to the share keeps the rectangle, one ulp above squares it."""
    seg = np.zeros((64, 96), np.float32)
    seg[20:30, 10:51] = 1
    reference = np.random.default_rng(5)
    reference.random(4)
    u = reference.random()
    for share, square in ((u, False), (np.nextafter(u, 1.0), True)):
        y0, y1, x0, x1 = _bbox(masks.box_mask(seg, np.random.default_rng(5), expand=(0.0, 0.0), square_share=share))
        assert (y1 - y0 == x1 - x0) is square


def _seed_drawing(kind: str) -> int:
    return next(s for s in range(100) if masks.paper_kind(np.random.default_rng(s).random()) == kind)


@pytest.mark.parametrize("through", ["paper_mix_mask", "generate_mask"])
@pytest.mark.parametrize("kind", masks.MASK_KINDS)
def test_paper_mix_passes_every_parameter_to_the_kind_it_draws(kind, through):
    seg = _object(64, 64)
    params = masks.IrregularMaskParams(dilation_scale=0.0, strokes=(1, 1), segments=(3, 3))
    chosen = {"box_expand": (0.5, 0.5), "irregular": params, "square_share": 1.0}
    seed = _seed_drawing(kind)
    polls: list[int] = []
    if through == "paper_mix_mask":
        mixed = masks.paper_mix_mask(seg, np.random.default_rng(seed), check_interrupt=lambda: polls.append(1),
                                     **chosen)
        assert mixed.kind == kind
        out = mixed.mask
    else:
        out = masks.generate_mask(seg, "paper_mix", np.random.default_rng(seed),
                                  check_interrupt=lambda: polls.append(1), **chosen)
    replay = np.random.default_rng(seed)
    replay.random()
    np.testing.assert_array_equal(out, masks.generate_mask(seg, kind, replay, **chosen))
    if kind != "segmentation":  # the chosen parameters give another mask than the defaults would
        default = np.random.default_rng(seed)
        default.random()
        assert not np.array_equal(out, masks.generate_mask(seg, kind, default))
    assert len(polls) == (3 if kind == "irregular" else 0)  # one poll per drawing op: 1 stroke of 3 segments


@pytest.mark.parametrize("share", [{}, {"square_share": 0.0}])
def test_generate_mask_paper_mix_squares_boxes_like_paper_mix_mask(share):
    """By default half the mix's boxes are squares through either function; a share of 0 is passed on too."""
    seg = np.zeros((64, 96), np.float32)
    seg[20:30, 10:51] = 1
    squares = 0
    for seed in (s for s in range(40) if masks.paper_kind(np.random.default_rng(s).random()) == "box"):
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        out = masks.generate_mask(seg, "paper_mix", a, **share)
        np.testing.assert_array_equal(out, masks.paper_mix_mask(seg, b, **share).mask)
        assert a.random() == b.random()  # the same draws taken, the square choice included (only for share > 0)
        y0, y1, x0, x1 = _bbox(out)
        squares += y1 - y0 == x1 - x0
    assert (squares > 0) == (not share)


def _object(h: int, w: int) -> np.ndarray:
    seg = np.zeros((h, w), dtype=np.float32)
    cv2.ellipse(seg, (w // 2, h // 2), (max(1, w // 8), max(1, h // 10)), 20, 0, 360, 1, -1)
    return seg


@pytest.mark.parametrize("mode", ["box", "irregular", "paper_mix"])
@pytest.mark.parametrize("size", [(64, 64), (97, 131), (512, 512)])
def test_different_seeds_give_different_masks(mode, size):
    seg = _object(*size)
    outs = {masks.generate_mask(seg, mode, np.random.default_rng(s)).tobytes() for s in range(8)}
    assert len(outs) >= 4 if mode != "paper_mix" else len(outs) >= 2
    if mode == "irregular":
        assert len(outs) == 8


@FAST
@given(h=st.integers(1, 64), w=st.integers(1, 64), seed=seeds, mode=st.sampled_from(masks.MASK_MODES))
def test_empty_and_full_inputs(h, w, seed, mode):
    rng = np.random.default_rng(seed)
    assert not masks.generate_mask(np.zeros((h, w), np.float32), mode, rng).any()
    assert masks.generate_mask(np.ones((h, w), np.float32), mode, rng).all()


@st.composite
def objects(draw):
    """Non-trivial inputs: one filled ellipse covering roughly 1-30 % of an image of 48-160 px per side."""
    h, w = draw(st.integers(48, 160)), draw(st.integers(48, 160))
    ry, rx = draw(st.integers(max(2, h // 16), h // 4)), draw(st.integers(max(2, w // 16), w // 4))
    cy, cx = draw(st.integers(ry, h - ry - 1)), draw(st.integers(rx, w - rx - 1))
    seg = np.zeros((h, w), np.uint8)
    cv2.ellipse(seg, (cx, cy), (rx, ry), draw(st.integers(0, 179)), 0, 360, 1, -1)
    return seg.astype(np.float32)


@FAST
@given(seg=objects(), seed=seeds, mode=st.sampled_from(["box", "irregular"]))
def test_different_seeds_differ_on_non_trivial_inputs(seg, seed, mode):
    # Two seeds may legitimately agree (a small box's expansion rounds to the same pixels, a small object's
    # irregular hole draws the same discrete choices: found by hypothesis), so the property is over 8 seeds.
    outs = {masks.generate_mask(seg, mode, np.random.default_rng(seed + k)).tobytes() for k in range(8)}
    assert len(outs) >= 2


def test_one_by_one_and_odd_sizes():
    rng = np.random.default_rng(2)
    for shape in [(1, 1), (1, 2), (3, 1), (5, 7), (511, 513)]:
        seg = np.zeros(shape, np.float32)
        seg[shape[0] // 2, shape[1] // 2] = 1
        for mode in masks.MASK_MODES:
            out = masks.generate_mask(seg, mode, rng)
            _assert_binary_like(out, seg)
            assert out[shape[0] // 2, shape[1] // 2] == 1


def test_input_dtypes_and_threshold():
    seg_u8 = np.zeros((9, 9), np.uint8)
    seg_u8[2:5, 3:6] = 255
    expected = (seg_u8 > 0).astype(np.float32)
    for seg in (seg_u8, seg_u8 > 0, seg_u8.astype(np.int64), expected.astype(np.float64)):
        np.testing.assert_array_equal(masks.segmentation_mask(seg), expected)
    soft = np.array([[0.0, 0.49, 0.5, 1.0]], np.float32)
    np.testing.assert_array_equal(masks.segmentation_mask(soft), [[0, 0, 1, 1]])
    # non-contiguous views work too
    np.testing.assert_array_equal(masks.segmentation_mask(expected.T), expected.T)


def test_paper_mix_frequencies():
    seg = _object(8, 8)
    rng = np.random.default_rng(1234)
    n = 4000
    kinds = [masks.paper_mix_mask(seg, rng).kind for _ in range(n)]
    freq = {k: kinds.count(k) / n for k in masks.MASK_KINDS}
    # 0.03 is > 4 standard deviations of a binomial frequency at p=0.25, n=4000.
    assert abs(freq["box"] - 0.25) < 0.03
    assert abs(freq["irregular"] - 0.50) < 0.03
    assert abs(freq["segmentation"] - 0.25) < 0.03


def test_paper_kind_thresholds_are_eq6():
    assert masks.paper_kind(0.0) == "box"
    assert masks.paper_kind(0.25) == "box"
    assert masks.paper_kind(np.nextafter(0.25, 1)) == "irregular"
    assert masks.paper_kind(0.75) == "irregular"
    assert masks.paper_kind(np.nextafter(0.75, 1)) == "segmentation"
    assert masks.paper_kind(1.0) == "segmentation"


def test_irregular_parameters_take_effect():
    seg = _object(128, 128)
    rng = np.random.default_rng(3)
    plain = masks.irregular_mask(seg, rng, masks.IrregularMaskParams(dilation_scale=0.0, strokes=(0, 0)))
    np.testing.assert_array_equal(plain, seg)
    dilated = masks.irregular_mask(seg, rng, masks.IrregularMaskParams(strokes=(0, 0)))
    assert dilated.sum() > seg.sum()
    ellipse = masks.generate_mask(seg, "irregular", rng, kernel_shape="ellipse", strokes=(0, 0))
    assert (ellipse >= seg).all() and ellipse.sum() > seg.sum()
    # more strokes -> more coverage on average
    few = np.mean([masks.generate_mask(seg, "irregular", np.random.default_rng(s), dilation_scale=0.0,
                                       strokes=(1, 1)).sum() for s in range(20)])
    many = np.mean([masks.generate_mask(seg, "irregular", np.random.default_rng(s), dilation_scale=0.0,
                                        strokes=(8, 8)).sum() for s in range(20)])
    assert many > few > seg.sum()


@pytest.mark.parametrize("ksize, iterations", [(1, 1), (1, 3), (2, 1), (2, 3), (3, 2), (4, 1), (7, 2), (12, 3),
                                                (22, 1), (23, 1), (31, 1), (32, 1), (90, 3)])
@pytest.mark.parametrize("content", ["sparse", "first corner", "last corner"])
def test_dilate_rect_equals_cv2_dilate_with_a_square_kernel(ksize, iterations, content):
    """Its docstring's promise, including kernels reaching just short of, exactly across and beyond the image."""
    u8 = np.zeros((23, 31), np.uint8)
    if content == "sparse":
        u8[:] = np.random.default_rng(0).random(u8.shape) < 0.03
    u8[(0, 0) if content == "first corner" else (-1, -1)] = 1
    for image in (u8, np.ascontiguousarray(u8.T)):  # wide and tall: each axis clips its reach to its own length
        expected = cv2.dilate(image, np.ones((ksize, ksize), np.uint8), iterations=iterations)
        out = masks.dilate_rect(image, ksize, iterations)
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, expected)


def _thin(kind: str) -> np.ndarray:
    u8 = np.zeros((200, 200), np.uint8)
    if kind == "ring":
        cv2.circle(u8, (100, 100), 60, 1, thickness=3)
    else:
        np.fill_diagonal(u8, 1)  # 1 pixel in 200 of its box: rejection sampling gives way to listing the pixels
    return u8


@pytest.mark.parametrize("kind, per_pixel", [("ring", 100), ("diagonal", 1000)])
def test_random_points_are_count_nonzero_pixels_drawn_uniformly(kind, per_pixel):
    u8 = _thin(kind)
    rng = np.random.default_rng(0)
    for count in (1, 3, 40):
        points = masks._random_points(u8, rng, count)
        assert points.shape == (count, 2)
        assert u8[points[:, 1], points[:, 0]].all()
    n = int(u8.sum())
    points = masks._random_points(u8, rng, per_pixel * n)
    hits = np.zeros(u8.shape, np.int64)
    np.add.at(hits, (points[:, 1], points[:, 0]), 1)
    assert not hits[u8 == 0].any()
    # a chi-square over n - 1 degrees of freedom stays below n + 6 sqrt(2n) unless the draw is biased
    assert ((hits[u8 != 0] - per_pixel) ** 2 / per_pixel).sum() < n + 6 * np.sqrt(2 * n)


# A saved workflow's seed must keep giving the same mask: these digests freeze the irregular scribble's stream of
# random draws (an intended change of the stream updates them and says so in the changelog).
IRREGULAR_STREAM = [
    ("object", {}, 11, "2a8e5c9f0355d00d"),
    ("object", {"strokes": (8, 8)}, 12, "d34c4d0d10f5f994"),
    ("diagonal", {"dilation_scale": 0.0, "strokes": (4, 4)}, 13, "4bb8a1f6d440dc7a"),
]


def _irregular_digest(kind: str, overrides: dict, seed: int) -> str:
    import hashlib

    seg = _object(200, 200) if kind == "object" else _thin(kind)
    rng = np.random.default_rng(seed)
    out = masks.generate_mask(seg, "irregular", rng, **overrides)
    return hashlib.sha256(np.packbits(out.astype(bool)).tobytes() + rng.bytes(8)).hexdigest()[:16]


@pytest.mark.parametrize("kind, overrides, seed, digest", IRREGULAR_STREAM)
def test_irregular_mask_of_a_seed_is_the_same_in_every_version(kind, overrides, seed, digest):
    assert _irregular_digest(kind, overrides, seed) == digest


@pytest.mark.parametrize("kernel_shape, kernel", [("rect", (0.02, 0.1)), ("ellipse", (0.02, 0.1)),
                                                  ("rect", (0.02, 0.02))])  # the last: a 2-px kernel, the smallest
def test_irregular_dilation_draws_kernel_and_iterations_uniformly_from_the_band(kernel_shape, kernel):
    """Algorithm 1 steps 6-8: kernel side ~ U[band.kernel] x short side (rounded), iterations ~ U{band.iterations},
    with a square or an elliptic structuring element."""
    band = masks.DilationBand(max_ratio=1.0, kernel=kernel, iterations=(1, 3))
    params = masks.IrregularMaskParams(dilation_bands=(band,), kernel_shape=kernel_shape, strokes=(0, 0))
    seg = _object(100, 120).astype(np.uint8)
    seen = set()
    for seed in range(12):
        reference = np.random.default_rng(seed)
        ksize = max(1, round(reference.uniform(*kernel) * 100))
        iterations = int(reference.integers(1, 4))
        seen.add((ksize, iterations))
        element = (np.ones((ksize, ksize), np.uint8) if kernel_shape == "rect"
                   else cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (ksize, ksize)))
        expected = cv2.dilate(seg, element, iterations=iterations)
        np.testing.assert_array_equal(masks.irregular_mask(seg, np.random.default_rng(seed), params), expected)
    assert {it for _, it in seen} == {1, 2, 3}
    assert len({k for k, _ in seen}) > 4 if kernel[0] < kernel[1] else {k for k, _ in seen} == {2}


def test_dilation_band_follows_coverage_ratio():
    bands = masks.DEFAULT_DILATION_BANDS
    p = masks.IrregularMaskParams()
    assert masks._pick_band(p, 0.0) is bands[0]
    assert masks._pick_band(p, 0.05) is bands[0]
    assert masks._pick_band(p, 0.3) is bands[2]
    assert masks._pick_band(p, 1.0) is bands[-1]


# ------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 3, 4), np.float32), r"2-D \(H, W\), got shape \(2, 3, 4\)"),
    (np.zeros(5, np.float32), r"2-D"),
    (np.zeros((0, 4), np.float32), r"empty shape"),
    (np.zeros((4, 4), np.complex64), r"dtype complex64 is not supported"),
    (np.array([["a"]]), r"is not supported"),
    (np.full((3, 3), np.nan, np.float32), r"NaN"),
    ([[0, 1]], r"numpy array, got list"),
])
def test_bad_inputs_raise_clear_errors(bad, match):
    for mode in masks.MASK_MODES:
        with pytest.raises(ValueError, match=match):
            masks.generate_mask(bad, mode, np.random.default_rng(0))


def test_bad_mode_params_and_rng():
    seg = _object(16, 16)
    with pytest.raises(ValueError, match=r"unknown mask mode 'scribble'; use one of segmentation, box"):
        masks.generate_mask(seg, "scribble", np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"unknown mask parameter\(s\) stroke"):
        masks.generate_mask(seg, "irregular", np.random.default_rng(0), stroke=(1, 2))
    with pytest.raises(TypeError, match=r"numpy.random.Generator.*default_rng"):
        masks.generate_mask(seg, "box", 123)
    with pytest.raises(ValueError, match=r"expand=\(0.5, 0.1\) needs"):
        masks.box_mask(seg, np.random.default_rng(0), expand=(0.5, 0.1))
    with pytest.raises(ValueError, match=r"strokes=\(3, 1\)"):
        masks.IrregularMaskParams(strokes=(3, 1))
    with pytest.raises(ValueError, match=r"shape_weights"):
        masks.IrregularMaskParams(shape_weights=(0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match=r"max_ratio=1.0"):
        masks.IrregularMaskParams(dilation_bands=(masks.DilationBand(0.5, (0.01, 0.02), (1, 1)),))
    with pytest.raises(ValueError, match=r"kernel_shape"):
        masks.IrregularMaskParams(kernel_shape="cross")


_BAND = masks.DilationBand
_FIELDS = "dilation_bands, dilation_scale, kernel_shape, length, segments, shape_weights, strokes, width"
EXACT_ERRORS = {
    "no bands": (ValueError, lambda: masks.IrregularMaskParams(dilation_bands=()),
                 "IrregularMaskParams.dilation_bands is empty; give at least one band with max_ratio=1.0"),
    "unsorted bands": (ValueError, lambda: masks.IrregularMaskParams(
        dilation_bands=(_BAND(0.5, (0.01, 0.02), (1, 1)), _BAND(0.5, (0.01, 0.02), (1, 1)))),
        "IrregularMaskParams.dilation_bands[1].max_ratio=0.5 is not above the previous band's 0.5; sort the bands by "
        "increasing max_ratio"),
    "bands ending below 1": (ValueError, lambda: masks.IrregularMaskParams(
        dilation_bands=(_BAND(0.5, (0.01, 0.02), (1, 1)),)),
        "IrregularMaskParams.dilation_bands[-1].max_ratio=0.5 leaves coverage ratios up to 1.0 without a band; end "
        "the bands with max_ratio=1.0"),
    "band iterations of 0": (ValueError, lambda: masks.IrregularMaskParams(
        dilation_bands=(_BAND(1.0, (0.01, 0.02), (0, 1)),)),
        "dilation_bands[0].iterations=(0, 1) needs 1 <= min <= max; swap or raise the values"),
    "band kernel reversed": (ValueError, lambda: masks.IrregularMaskParams(
        dilation_bands=(_BAND(1.0, (0.05, 0.01), (1, 1)),)),
        "dilation_bands[0].kernel=(0.05, 0.01) needs 0.0 <= min <= max; swap or raise the values"),
    "band iterations of floats": (ValueError, lambda: masks.IrregularMaskParams(
        dilation_bands=(_BAND(0.5, (0.01, 0.02), (1, 1)), _BAND(1.0, (0.01, 0.02), (1.0, 2.0)))),
        "dilation_bands[1].iterations=(1.0, 2.0) must be a (min, max) pair of finite integers"),
    "float segments": (ValueError, lambda: masks.IrregularMaskParams(segments=(1.0, 2.0)),
                       "segments=(1.0, 2.0) must be a (min, max) pair of finite integers"),
    "width reversed": (ValueError, lambda: masks.IrregularMaskParams(width=(0.1, 0.05)),
                       "width=(0.1, 0.05) needs 0.0 <= min <= max; swap or raise the values"),
    "strokes reversed": (ValueError, lambda: masks.IrregularMaskParams(strokes=(3, 1)),
                         "strokes=(3, 1) needs 0 <= min <= max; swap or raise the values"),
    "length reversed": (ValueError, lambda: masks.IrregularMaskParams(length=(0.3, 0.1)),
                        "length=(0.3, 0.1) needs 0.0 <= min <= max; swap or raise the values"),
    "infinite scale": (ValueError, lambda: masks.IrregularMaskParams(dilation_scale=float("inf")),
                       "IrregularMaskParams.dilation_scale=inf must be a finite number >= 0 (1.0 = default dilation, "
                       "0 = none)"),
    "negative weight": (ValueError, lambda: masks.IrregularMaskParams(shape_weights=(1.0, -0.5, 1.0)),
                        "IrregularMaskParams.shape_weights=(1.0, -0.5, 1.0) must be three finite weights >= 0 for "
                        "(line, circle, square) with a positive sum, e.g. (0.6, 0.2, 0.2)"),
    "infinite weight": (ValueError, lambda: masks.IrregularMaskParams(shape_weights=(float("inf"), 1.0, 1.0)),
                        "IrregularMaskParams.shape_weights=(inf, 1.0, 1.0) must be three finite weights >= 0 for "
                        "(line, circle, square) with a positive sum, e.g. (0.6, 0.2, 0.2)"),
    "bool strokes": (ValueError, lambda: masks.IrregularMaskParams(strokes=(True, 3)),
                     "strokes=(True, 3) must be a (min, max) pair of finite integers"),
    "text strokes": (ValueError, lambda: masks.IrregularMaskParams(strokes=(1, "3")),
                     "strokes=(1, '3') must be a (min, max) pair of finite integers"),
    "negative scale": (ValueError, lambda: masks.IrregularMaskParams(dilation_scale=-1.0),
                       "IrregularMaskParams.dilation_scale=-1.0 must be a finite number >= 0 (1.0 = default dilation, "
                       "0 = none)"),
    "cross kernel": (ValueError, lambda: masks.IrregularMaskParams(kernel_shape="cross"),
                     "IrregularMaskParams.kernel_shape='cross' is not one of 'rect', 'ellipse'"),
    "zero weights": (ValueError, lambda: masks.IrregularMaskParams(shape_weights=(0.0, 0.0, 0.0)),
                     "IrregularMaskParams.shape_weights=(0.0, 0.0, 0.0) must be three finite weights >= 0 for (line, "
                     "circle, square) with a positive sum, e.g. (0.6, 0.2, 0.2)"),
    "not a pair": (ValueError, lambda: masks.IrregularMaskParams(strokes=3),
                   "strokes=3 must be a (min, max) pair of integers"),
    "float strokes": (ValueError, lambda: masks.IrregularMaskParams(strokes=(1.0, 2.0)),
                      "strokes=(1.0, 2.0) must be a (min, max) pair of finite integers"),
    "infinite length": (ValueError, lambda: masks.IrregularMaskParams(length=(0.1, float("inf"))),
                        "length=(0.1, inf) must be a (min, max) pair of finite numbers"),
    "no segments": (ValueError, lambda: masks.IrregularMaskParams(segments=(0, 2)),
                    "segments=(0, 2) needs 1 <= min <= max; swap or raise the values"),
    "list": (ValueError, lambda: masks.generate_mask([[0, 1]], "box", np.random.default_rng(0)),
             "segmentation must be a numpy array, got list; convert it first (torch: t.detach().cpu().numpy())"),
    "3-D": (ValueError, lambda: masks.generate_mask(np.zeros((1, 2, 2)), "box", np.random.default_rng(0)),
            "segmentation must be 2-D (H, W), got shape (1, 2, 2); pass one mask at a time (index a batch, squeeze a "
            "channel axis)"),
    "empty": (ValueError, lambda: masks.generate_mask(np.zeros((0, 2)), "segmentation", np.random.default_rng(0)),
              "segmentation has an empty shape (0, 2); it needs at least 1x1 pixels"),
    "NaN": (ValueError, lambda: masks.generate_mask(np.full((2, 2), np.nan), "segmentation", np.random.default_rng(0)),
            "segmentation contains NaN; replace it (np.nan_to_num) before generating a mask"),
    "complex": (ValueError, lambda: masks.generate_mask(np.zeros((2, 2), np.complex64), "segmentation",
                                                        np.random.default_rng(0)),
                "segmentation dtype complex64 is not supported; use bool, an integer type (non-zero = object) or a "
                "float type (>= 0.5 = object)"),
    "seeded random": (TypeError, lambda: masks.box_mask(_object(8, 8), 7),
                      "rng must be a numpy.random.Generator, got int; use numpy.random.default_rng(seed)"),
    "square share": (ValueError, lambda: masks.box_mask(_object(8, 8), np.random.default_rng(0), square_share=1.5),
                     "square_share=1.5 must be a probability in [0, 1]"),
    "zero kernel": (ValueError, lambda: masks.dilate_rect(np.zeros((4, 4), np.uint8), 0, 1),
                    "dilate_rect needs ksize >= 1 and iterations >= 1, got 0, 1"),
    "zero iterations": (ValueError, lambda: masks.dilate_rect(np.zeros((4, 4), np.uint8), 3, 0),
                        "dilate_rect needs ksize >= 1 and iterations >= 1, got 3, 0"),
    "params of another type": (TypeError, lambda: masks.irregular_mask(_object(8, 8), np.random.default_rng(0), {}),
                               "params must be an IrregularMaskParams, got dict"),
    "scribble": (ValueError, lambda: masks.generate_mask(_object(8, 8), "scribble", np.random.default_rng(0)),
                 "unknown mask mode 'scribble'; use one of segmentation, box, irregular, paper_mix"),
    "misspelt parameters": (ValueError, lambda: masks.generate_mask(_object(8, 8), "box", np.random.default_rng(0),
                                                                    stroke=1, blur=2),
                            "unknown mask parameter(s) blur, stroke; use box_expand, square_share, irregular or one "
                            f"of {_FIELDS}"),
    "irregular of another type": (TypeError, lambda: masks.generate_mask(_object(8, 8), "irregular",
                                                                         np.random.default_rng(0), irregular="wide"),
                                  "irregular must be an IrregularMaskParams, got str"),
}


@pytest.mark.parametrize("case", list(EXACT_ERRORS))
def test_error_messages_are_exact(case):
    """The message is the contract (it names the bad value and the fix): anchored whole, so any edit of it shows."""
    kind, call, message = EXACT_ERRORS[case]
    with pytest.raises(kind, match=f"^{re.escape(message)}$"):
        call()


# --------------------------------------------------------------------------------------------------------- node


def test_node_batch_is_reproducible_and_items_differ():
    module = _load_mask_nodes()
    node = module.PainterNetMaskGenerator
    seg = torch.from_numpy(_object(96, 80))
    batch = torch.stack([seg, seg])
    (a,) = node.execute(batch, "irregular", 42)
    (b,) = node.execute(batch, "irregular", 42)
    (c,) = node.execute(batch, "irregular", 43)
    assert a.shape == (2, 96, 80) and a.dtype == torch.float32 and a.device.type == "cpu"
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])  # same input, independent streams per item
    assert not torch.equal(a, c)
    assert bool((a >= batch).all())
    # item i's stream depends on (seed, i) only
    rng0 = np.random.Generator(np.random.PCG64(np.random.SeedSequence(42).spawn(2)[0]))
    np.testing.assert_array_equal(a[0].numpy(), masks.irregular_mask(seg.numpy(), rng0))


def test_node_modes_shapes_and_widgets():
    module = _load_mask_nodes()
    node = module.PainterNetMaskGenerator
    seg = torch.from_numpy(_object(33, 47))
    (single,) = node.execute(seg, "segmentation", 0)
    assert single.shape == (1, 33, 47)
    assert torch.equal(single[0], seg)
    (box,) = node.execute(seg, "box", 5, box_expand_min=0.0, box_expand_max=0.0)
    ys, xs = np.nonzero(seg.numpy())
    assert int(box.sum()) == (np.ptp(ys) + 1) * (np.ptp(xs) + 1)
    (mix,) = node.execute(torch.stack([seg] * 6), "paper_mix", 7)
    assert mix.shape == (6, 33, 47)

    inputs = module.PainterNetMaskGenerator.INPUT_TYPES()
    assert inputs["required"]["mode"][1]["options"] == list(masks.MASK_MODES)
    assert inputs["required"]["seed"][1]["max"] == 0xFFFFFFFFFFFFFFFF
    assert inputs["required"]["seed"][1]["control_after_generate"] is True
    for group in inputs.values():
        for name, spec in group.items():
            assert spec[1].get("tooltip"), f"input {name} has no tooltip"
    # every optional widget is a keyword of the function with the same default
    import inspect
    signature = inspect.signature(module.PainterNetMaskGenerator.execute)
    for name, spec in inputs["optional"].items():
        assert signature.parameters[name].default == spec[1]["default"], name
    assert module.NODES == [module.PainterNetMaskGenerator]
    assert module.PainterNetMaskGenerator.GET_SCHEMA().display_name == "PainterNet Mask Generator"
    assert module.PainterNetMaskGenerator.CATEGORY == "inpaint/PainterNet"


def test_node_rejects_bad_input():
    module = _load_mask_nodes()
    node = module.PainterNetMaskGenerator
    with pytest.raises(ValueError, match=r"\(B, H, W\) or \(H, W\), got \(1, 1, 4, 4\)"):
        node.execute(torch.zeros(1, 1, 4, 4), "box", 0)
    with pytest.raises(ValueError, match=r"PainterNetMaskGenerator: input mode='blob' is not one of \['segmentation'"):
        node.execute(torch.zeros(1, 4, 4), "blob", 0)
    with pytest.raises(ValueError, match=r"box_expand|expand"):
        node.execute(torch.zeros(1, 4, 4), "box", 0, box_expand_min=0.5, box_expand_max=0.1)


MAXED = masks.IrregularMaskParams(dilation_scale=10.0, strokes=(64, 64), segments=(64, 64), length=(2.0, 2.0),
                                  width=(1.0, 1.0))


def _counting_draws(monkeypatch) -> list[str]:
    """Record every OpenCV drawing op the scribble makes (each costs up to the image's area)."""
    calls: list[str] = []
    for name in ("line", "circle", "fillConvexPoly"):
        real = getattr(cv2, name)
        monkeypatch.setattr(masks.cv2, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    return calls


def test_shape_weights_are_relative_probabilities_of_line_circle_square(monkeypatch):
    seg = _object(128, 128)
    base = dict(dilation_scale=0.0, strokes=(20, 20), segments=(20, 20), width=(0.005, 0.005))
    calls = _counting_draws(monkeypatch)
    for weights, only in (((1.0, 0.0, 0.0), "line"), ((0.0, 2.0, 0.0), "circle"), ((0.0, 0.0, 5.0), "fillConvexPoly")):
        calls.clear()
        masks.generate_mask(seg, "irregular", np.random.default_rng(0), shape_weights=weights, **base)
        assert calls == [only] * 400
    calls.clear()
    masks.generate_mask(seg, "irregular", np.random.default_rng(0), shape_weights=(1.0, 1.0, 2.0), **base)
    shares = [calls.count(op) / 400 for op in ("line", "circle", "fillConvexPoly")]
    assert np.allclose(shares, (0.25, 0.25, 0.5), atol=0.08)  # 0.08 is over 3.5 binomial deviations at n = 400
    for seed in range(4):  # only the ratios count
        a = masks.generate_mask(seg, "irregular", np.random.default_rng(seed), shape_weights=(3.0, 1.0, 1.0))
        b = masks.generate_mask(seg, "irregular", np.random.default_rng(seed), shape_weights=(0.6, 0.2, 0.2))
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("width, pixels", [((0.0, 0.0), 1), ((0.004, 0.004), 1), ((0.1, 0.1), 6), ((0.3, 0.3), 19)])
def test_brush_is_the_width_fraction_of_the_short_side_and_at_least_one_pixel(monkeypatch, width, pixels):
    thickness: list[int] = []
    real = cv2.line
    monkeypatch.setattr(masks.cv2, "line", lambda *a, **k: thickness.append(k["thickness"]) or real(*a, **k))
    seg = _object(64, 96)  # short side 64
    masks.generate_mask(seg, "irregular", np.random.default_rng(0), dilation_scale=0.0, strokes=(2, 2),
                        segments=(3, 3), shape_weights=(1.0, 0.0, 0.0), width=width)
    assert thickness == [pixels] * 6


def test_segment_ends_stay_inside_the_image_and_reach_every_border(monkeypatch):
    ends: list[tuple[int, int]] = []
    real = cv2.line
    monkeypatch.setattr(masks.cv2, "line", lambda img, a, b, *r, **k: ends.append(b) or real(img, a, b, *r, **k))
    seg = _object(40, 60)
    masks.generate_mask(seg, "irregular", np.random.default_rng(1), dilation_scale=0.0, strokes=(8, 8),
                        segments=(8, 8), length=(2.0, 2.0), width=(0.0, 0.0), shape_weights=(1.0, 0.0, 0.0))
    xs, ys = zip(*ends)
    assert len(ends) == 64
    assert (min(xs), max(xs), min(ys), max(ys)) == (0, 59, 0, 39)  # segments twice the short side: clipped


class _SegmentDraws(np.random.Generator):
    """A generator that keeps the last per-segment draw (shape, angle, length, width) the scribble takes."""

    def random(self, *args, **kwargs):
        out = super().random(*args, **kwargs)
        if np.shape(out) == (1, 4):
            self.segment = out[0]
        return out


@pytest.mark.parametrize("boundary", ["line", "circle"])
def test_segment_shape_is_the_first_whose_cumulative_share_is_above_the_draw(monkeypatch, boundary):
    """P(line) = w_line / sum exactly (u < share, u ~ U[0, 1)): a draw equal to a cumulative share is the next shape."""
    seg = _object(64, 64)
    one = dict(dilation_scale=0.0, strokes=(1, 1), segments=(1, 1))
    recorder = _SegmentDraws(np.random.PCG64(3))
    masks.generate_mask(seg, "irregular", recorder, **one)
    u = float(recorder.segment[0])
    weights = (u, 1.0 - u, 0.0) if boundary == "line" else (0.0, u, 1.0 - u)
    assert sum(weights) == 1.0  # so the cumulative share is u itself
    calls = _counting_draws(monkeypatch)
    masks.generate_mask(seg, "irregular", _SegmentDraws(np.random.PCG64(3)), shape_weights=weights, **one)
    assert calls == (["circle"] if boundary == "line" else ["fillConvexPoly"])


def test_full_coverage_is_looked_at_once_per_image_area_drawn(monkeypatch):
    """The look costs a pass over the image, so it comes only after shapes adding up to the image's area."""
    looks: list[int] = []
    real = cv2.countNonZero
    monkeypatch.setattr(masks.cv2, "countNonZero", lambda m: looks.append(1) or real(m))
    seg = np.zeros((2, 2), np.float32)
    seg[0, 0] = 1
    for segments, drawn_looks in ((1, 0), (2, 1)):  # discs of radius 1: pi < 4 px < 2 pi
        looks.clear()
        masks.generate_mask(seg, "irregular", np.random.default_rng(0), dilation_scale=0.0, strokes=(1, 1),
                            segments=(segments, segments), shape_weights=(0.0, 1.0, 0.0), width=(0.5, 0.5))
        assert len(looks) == 1 + drawn_looks  # the first is the coverage ratio of the segmentation
    looks.clear()
    masks.generate_mask(_object(256, 256), "irregular", np.random.default_rng(0))
    assert len(looks) == 1  # a default scribble covers far less than the image: never looked at


@pytest.mark.parametrize("weights, per_op", [((1.0, 0.0, 0.0), (25 + 10) * 10), ((0.0, 1.0, 0.0), np.pi * 10 * 10),
                                             ((0.0, 0.0, 1.0), 4 * 10 * 10)])
def test_each_shape_counts_its_own_area_towards_the_next_look(monkeypatch, weights, per_op):
    """A line counts (length + width) x width, a disc pi width², a square (side 2 width) 4 width²: the look at full
    coverage comes with the op that brings the sum to the image's area, not one op earlier or later."""
    looks: list[int] = []
    real = cv2.countNonZero
    monkeypatch.setattr(masks.cv2, "countNonZero", lambda m: looks.append(1) or real(m))
    seg = _object(100, 100)
    at = int(np.ceil(100 * 100 / per_op))
    for ops, drawn_looks in ((at - 1, 0), (at, 1)):
        looks.clear()
        masks.generate_mask(seg, "irregular", np.random.default_rng(0), dilation_scale=0.0, strokes=(1, 1),
                            segments=(ops, ops), length=(0.25, 0.25), width=(0.1, 0.1), shape_weights=weights)
        assert len(looks) == 1 + drawn_looks


def test_after_a_look_the_count_starts_again_from_zero(monkeypatch):
    """Lines of 399.98 px on a 10 000 px image: 25 make 9999.5 (no look), the 26th brings the first look; the next
    comes with the 52nd, not the 51st."""
    looks: list[int] = []
    real = cv2.countNonZero
    monkeypatch.setattr(masks.cv2, "countNonZero", lambda m: looks.append(1) or real(m))
    for ops, drawn_looks in ((25, 0), (26, 1), (51, 1), (52, 2)):
        looks.clear()
        masks.generate_mask(_object(100, 100), "irregular", np.random.default_rng(0), dilation_scale=0.0,
                            strokes=(1, 1), segments=(ops, ops), length=(0.29998, 0.29998), width=(0.1, 0.1),
                            shape_weights=(1.0, 0.0, 0.0))
        assert len(looks) == 1 + drawn_looks


def test_scribble_at_every_maximum_stops_drawing_once_the_mask_is_full(monkeypatch):
    """The node's largest values (64 drawings x 64 segments, brush = the short side) once cost 4096 image-sized
    fills (~25 s per 8192² item); once the shapes cover the image nothing more is drawn, and the output and the
    generator's state are those of drawing everything."""
    seg = np.zeros((512, 512), np.float32)
    seg[200:220, 300:330] = 1.0
    calls = _counting_draws(monkeypatch)
    rng = np.random.default_rng(7)
    out = masks.irregular_mask(seg, rng, MAXED)
    assert out.min() == 1.0 and 0 < len(calls) < 64
    after = rng.random()
    reference = np.random.default_rng(7)
    monkeypatch.setattr(masks.cv2, "countNonZero", lambda m: -1)  # never "full": every op drawn, as before
    calls.clear()
    assert np.array_equal(masks.irregular_mask(seg, reference, MAXED), out)
    assert len(calls) == 64 * 64 and reference.random() == after


def test_node_polls_the_interrupt_inside_one_item(monkeypatch):
    """One 64 x 64-op scribble is one item: the interrupt is polled before every op, not only between items."""
    module = _load_mask_nodes()
    polls: list[int] = []

    class Interrupted(Exception):
        pass

    def poll() -> None:
        polls.append(1)
        if len(polls) == 3:
            raise Interrupted

    from harness.comfy_helpers import pack_module

    monkeypatch.setattr(pack_module("nodes.mask_nodes"), "interrupt_poll", lambda: poll)
    seg = torch.zeros(1, 256, 256)
    seg[:, 100:120, 100:140] = 1.0
    with pytest.raises(Interrupted):
        module.PainterNetMaskGenerator.execute(seg, "irregular", 3, dilation_scale=0.0, strokes_min=2,
                                                   strokes_max=2, segments_min=5, segments_max=5, width_max=0.05)
    assert len(polls) == 3
