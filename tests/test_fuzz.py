"""Property layer over untrusted inputs (issue 12), with hypothesis: safetensors headers, stored configs, shape
documents and the rect dilation. Properties, not examples: any valid file loads whatever its header length; any
corruption is the pack's ValueError and never another exception type; drawing work is bounded by a multiple of the
image area, counted (never timed).
"""
from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from painternet_core import shapes
from painternet_core.checkpoint import inspect_branch, load_branch, read_header, reference_shapes
from painternet_core.config import TINY_SD15_UNET, TINY_SDXL_UNET, PainterNetConfig
from test_untrusted import write_safetensors

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@st.composite
def tensor_sets(draw):
    names = draw(st.lists(st.text(st.characters(min_codepoint=33, max_codepoint=0x2FFF), min_size=1, max_size=20)
                          .filter(lambda n: n != "__metadata__"), min_size=1, max_size=5, unique=True))
    out = {}
    for name in names:
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        values = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape).to(DTYPES[dtype])
        out[name] = (dtype, shape, values.reshape(-1).view(torch.uint8).numpy().tobytes())
    return out


@SETTINGS
@given(tensors=tensor_sets(), residue=st.integers(0, 255),
       metadata=st.dictionaries(st.text(max_size=10), st.text(max_size=30), max_size=3))
def test_valid_files_of_every_header_length_are_read_exactly(tmp_path_factory, tensors, residue, metadata):
    from safetensors import safe_open

    metadata.pop("pad", None)
    path = tmp_path_factory.mktemp("valid") / "f.safetensors"
    write_safetensors(path, tensors, metadata, header_len_mod_256=residue)
    header = read_header(str(path))
    assert set(header.tensors) == set(tensors)
    with safe_open(str(path), framework="pt") as fh:
        for name, (dtype, shape, _) in tensors.items():
            assert header.tensors[name].dtype == dtype and list(header.tensors[name].shape) == shape
            assert list(fh.get_tensor(name).shape) == shape
    assert {k: v for k, v in header.metadata.items() if k != "pad"} == metadata


@pytest.fixture(scope="module")
def small_branch(tmp_path_factory):
    """A complete, loadable branch file small enough to corrupt thousands of times: the tiny SD1.5 topology with
    one block, so its header carries real metadata and a real config."""
    unet = dict(TINY_SD15_UNET, block_out_channels=[32], down_block_types=["CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D"], layers_per_block=1)
    config = PainterNetConfig(family="sd15", unet=unet)
    shapes_ = reference_shapes(config)
    g = torch.Generator().manual_seed(0)
    tensors = {k: ("F32", list(s), torch.randn(s, generator=g).numpy().tobytes()) for k, s in shapes_.items()}
    path = tmp_path_factory.mktemp("small") / "small.safetensors"
    write_safetensors(path, tensors, {"painternet_format": "1", "painternet_config": config.to_json()})
    load_branch(str(path))  # the uncorrupted file is valid
    return str(path)  # a path, not the bytes: hypothesis prints fixture values when reporting a failure


def _load_or_value_error(data: bytes, tmp_path_factory) -> None:
    path = tmp_path_factory.mktemp("corrupt") / "c.safetensors"
    path.write_bytes(data)
    try:
        load_branch(str(path))
    except ValueError:
        pass


@SETTINGS
@given(data=st.data())
def test_byte_corruptions_are_a_value_error(small_branch, tmp_path_factory, data):
    with open(small_branch, "rb") as fh:
        raw = bytearray(fh.read())
    (n,) = struct.unpack("<Q", raw[:8])
    kind = data.draw(st.sampled_from(["flip", "truncate", "length"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, 8 + n - 1))] = data.draw(st.integers(0, 255))
    elif kind == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    else:
        raw[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    _load_or_value_error(bytes(raw), tmp_path_factory)


@SETTINGS
@given(data=st.data())
def test_header_value_corruptions_are_a_value_error(small_branch, tmp_path_factory, data):
    """Replace one value anywhere in the header JSON (an entry, a dtype, a shape, an offset, the metadata, a field
    of the stored config) with a random JSON value."""
    with open(small_branch, "rb") as fh:
        small_branch = fh.read()
    (n,) = struct.unpack("<Q", small_branch[:8])
    header = json.loads(small_branch[8:8 + n])
    config = json.loads(header["__metadata__"]["painternet_config"])
    target = data.draw(st.sampled_from(["entry", "field", "config", "unet"]))
    if target == "entry":
        key = data.draw(st.sampled_from(sorted(header)))
        header[key] = data.draw(json_values)
    elif target == "field":
        key = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[key][field] = data.draw(json_values)
    else:
        holder = config if target == "config" else config["unet"]
        holder[data.draw(st.sampled_from(sorted(holder)))] = data.draw(json_values)
        header["__metadata__"]["painternet_config"] = json.dumps(config)
    text = json.dumps(header).encode()
    _load_or_value_error(struct.pack("<Q", len(text)) + text + small_branch[8 + n:], tmp_path_factory)


# Values near and beyond the bounds of every numeric topology field, and of the wrong types.
topology_values = (st.integers(-2, 10) | st.sampled_from([32, 64, 96, 128, 4096, 4097, 10**9]) | st.floats()
                   | st.lists(st.integers(0, 130), max_size=7) | st.none() | st.booleans() | st.text(max_size=5))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from([("sd15", TINY_SD15_UNET), ("sdxl", TINY_SDXL_UNET)]),
       changes=st.dictionaries(st.sampled_from(["block_out_channels", "layers_per_block", "attention_head_dim",
                                                "transformer_layers_per_block", "cross_attention_dim",
                                                "norm_num_groups", "projection_class_embeddings_input_dim",
                                                "addition_time_embed_dim", "down_block_types", "in_channels"]),
                               topology_values, min_size=1, max_size=2))
def test_random_configs_are_refused_or_build_on_meta(base, changes):
    """A config either fails validation with ValueError or describes a branch both builders construct (on the meta
    device, so this costs no memory whatever it asks for) with the same keys and shapes, so what the trainer writes
    the ComfyUI loader accepts; never a TypeError/ZeroDivisionError/IndexError."""
    from harness.comfy_helpers import pack_module

    family, unet = base
    data = {"family": family, "unet": dict(unet, **changes)}
    try:
        config = PainterNetConfig.from_json(json.dumps(data))
    except ValueError:
        return
    reference = reference_shapes(config)
    comfy = pack_module("nodes.branch").comfy_reference_shapes(config)
    assert comfy == reference


@st.composite
def shape_documents(draw):
    coordinate = st.floats(-1.0, 2.0)
    items = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            items.append({"type": "box", "x": draw(coordinate), "y": draw(coordinate),
                          "w": draw(st.floats(0, 2)), "h": draw(st.floats(0, 2))})
        else:
            n = draw(st.integers(1, 400))
            seed = draw(st.integers(0, 2**32 - 1))
            points = np.random.default_rng(seed).uniform(-1, 2, size=(n, 2)).tolist()
            items.append({"type": "stroke", "width": draw(st.floats(1e-4, 1.0)), "points": points})
    return json.dumps({"version": 1, "shapes": items})


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=shape_documents(), height=st.integers(1, 160), width=st.integers(1, 160))
def test_shape_documents_draw_within_a_work_budget_linear_in_area(text, height, width):
    """Accepted documents do at most `raster_budget` units of work (a multiple of the area), counted; the drawing is
    split into chunks of bounded work between interrupt polls, and chunking changes no pixel."""
    doc = shapes.parse_shapes(text)
    work, budget = shapes.raster_work(doc, height, width), shapes.raster_budget(height, width)
    polls = []
    try:
        mask = shapes.rasterize(doc, height, width, check_interrupt=lambda: polls.append(1))
    except ValueError as exc:
        assert work > budget and "units of drawing work" in str(exc)
        return
    assert work <= budget
    assert mask.shape == (height, width) and set(np.unique(mask)) <= {0.0, 1.0}
    # Interrupt polls: one per shape plus one per chunk boundary, and chunks are at most ~RASTER_CHUNK_WORK each.
    assert len(polls) <= len(doc) + work // shapes.RASTER_CHUNK_WORK + len(doc)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=shape_documents(), height=st.integers(1, 64), width=st.integers(1, 64), chunk=st.integers(1, 200))
def test_chunk_size_never_changes_the_pixels(text, height, width, chunk):
    doc = shapes.parse_shapes(text)
    assume(shapes.raster_work(doc, height, width) <= shapes.raster_budget(height, width))
    whole = shapes.rasterize(doc, height, width)
    saved = shapes.RASTER_CHUNK_WORK
    shapes.RASTER_CHUNK_WORK = chunk
    try:
        np.testing.assert_array_equal(shapes.rasterize(doc, height, width), whole)
    finally:
        shapes.RASTER_CHUNK_WORK = saved


@settings(max_examples=150, deadline=None)
@given(value=json_values)
def test_any_json_as_shapes_is_the_packs_value_error_or_a_document(value):
    try:
        doc = shapes.parse_shapes(json.dumps(value))
    except ValueError:
        return
    assert all(isinstance(s, (shapes.Box, shapes.Stroke)) for s in doc)


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=300))
def test_any_text_as_shapes_is_the_packs_value_error_or_a_document(text):
    try:
        shapes.parse_shapes(text)
    except ValueError:
        pass


@settings(max_examples=100, deadline=None)
@given(height=st.integers(1, 40), width=st.integers(1, 40), ksize=st.integers(1, 90), iterations=st.integers(1, 3),
       density=st.floats(0, 0.3), seed=st.integers(0, 2**32 - 1))
def test_rect_dilation_equals_cv2_dilate(height, width, ksize, iterations, density, seed):
    import cv2

    from painternet_core.masks import dilate_rect

    u8 = (np.random.default_rng(seed).random((height, width)) < density).astype(np.uint8)
    expected = cv2.dilate(u8, np.ones((ksize, ksize), np.uint8), iterations=iterations)
    np.testing.assert_array_equal(dilate_rect(u8, ksize, iterations), expected)


def test_inspect_reads_no_tensor_data(small_branch, tmp_path):
    """Config and shapes come from the header alone: a file whose data section is garbage still inspects (the
    tensors are only read, and checked, by load_branch)."""
    with open(small_branch, "rb") as fh:
        small_branch = fh.read()
    (n,) = struct.unpack("<Q", small_branch[:8])
    path = tmp_path / "garbage-data.safetensors"
    path.write_bytes(small_branch[:8 + n] + bytes([0xFF]) * (len(small_branch) - 8 - n))
    _, config, names = inspect_branch(str(path))
    assert config.family == "sd15" and names
    with pytest.raises(ValueError, match="contains NaN or infinite values"):
        load_branch(str(path))
