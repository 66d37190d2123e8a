"""Crop & stitch through a real `main.py --cpu` server: the SD1.5 example workflow converted from its UI format to
an API prompt runs end to end with the tiny models and keeps every pixel outside the band; bad inputs fail with a
message naming the node and the fix, and the server answers a valid prompt afterwards."""
from __future__ import annotations

import json
import os
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

from painternet_core.shapes import render_mask
from harness.server import (branch_off, branch_problems, error_text, load_workflow, saved_pixels, start_sd15_server,
                            ui_to_api, workflow_prompt)

pytestmark = pytest.mark.server

WORKFLOWS = ("painternet_sd15_crop_stitch.json", "painternet_sdxl_crop_stitch.json", "painternet_sd15_outpaint.json")
HEIGHT, WIDTH = 283, 397


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_sd15_server(str(tmp_path_factory.mktemp("comfy-crop")))
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    rgb = np.stack([xx * 255 // WIDTH, yy * 255 // HEIGHT, (xx + yy) % 256], axis=-1).astype(np.uint8)
    Image.fromarray(rgb, "RGB").save(os.path.join(srv.input_dir, "photo.png"))
    yield srv
    srv.stop()


@pytest.mark.parametrize("name", WORKFLOWS)
def test_example_workflows_match_the_server_nodes(server, name):
    info = server.object_info()
    graph = load_workflow(name)
    prompt = workflow_prompt(graph, info)
    for node_id, node in prompt.items():
        assert set(info[node["class_type"]]["input"]["required"]) <= set(node["inputs"]), node_id
    types = [n["type"] for n in graph["nodes"]]
    assert {"PainterNetCrop", "PainterNetApply", "KSampler", "VAEDecode", "PainterNetStitch", "SaveImage"} <= set(types)


def test_sd15_crop_stitch_workflow_runs_and_keeps_the_photo(server):
    info = server.object_info()
    graph = load_workflow("painternet_sd15_crop_stitch.json")
    prompt = ui_to_api(graph, info)
    kinds = {n["class_type"]: k for k, n in prompt.items()}
    prompt[kinds["CheckpointLoaderSimple"]]["inputs"]["ckpt_name"] = "tiny-sd15.safetensors"
    prompt[kinds["PainterNetLoader"]]["inputs"]["painternet_name"] = "tiny-sd15-branch.safetensors"
    prompt[kinds["LoadImage"]]["inputs"]["image"] = "photo.png"
    # CI budget: 2 sampler steps and a 128² crop instead of 25 steps at the branch's 512² (the graph is unchanged).
    prompt[kinds["KSampler"]]["inputs"]["steps"] = 2
    crop_inputs = prompt[kinds["PainterNetCrop"]]["inputs"]
    assert crop_inputs["resolution"] == 0 and crop_inputs["painternet"][0] == kinds["PainterNetLoader"]
    crop_inputs["resolution"] = 128
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", error_text(entry)
    out = saved_pixels(server, entry, kinds["SaveImage"])
    original = np.asarray(Image.open(os.path.join(server.input_dir, "photo.png")).convert("RGB"))
    assert out.shape == original.shape == (HEIGHT, WIDTH, 3)
    shapes = prompt[kinds["PainterNetBoxMask"]]["inputs"]["shapes"]
    hole = render_mask(shapes, HEIGHT, WIDTH) > 0.5
    r = crop_inputs["grow"] + crop_inputs["feather"]
    band = cv2.dilate(hole.astype(np.uint8), np.ones((2 * r + 1, 2 * r + 1), np.uint8)) > 0
    assert np.array_equal(out[~band], original[~band])
    # The branch acts: the same graph at scale 0 paints another hole and stitches the same photo around it.
    off = server.run(branch_off(prompt))
    assert off["status"]["status_str"] == "success", error_text(off)
    problems = branch_problems(out, saved_pixels(server, off, kinds["SaveImage"]), hole, ~band, 0)
    assert not problems, "; ".join(problems)


def test_sd15_outpaint_workflow_extends_the_photo(server):
    """Pad for Outpainting → crop of the padded strip → … → stitch: the result is the padded size, the photo's own
    pixels are kept away from the band, and the padding is painted over."""
    info = server.object_info()
    prompt = ui_to_api(load_workflow("painternet_sd15_outpaint.json"), info)
    kinds = {n["class_type"]: k for k, n in prompt.items()}
    prompt[kinds["CheckpointLoaderSimple"]]["inputs"]["ckpt_name"] = "tiny-sd15.safetensors"
    prompt[kinds["PainterNetLoader"]]["inputs"]["painternet_name"] = "tiny-sd15-branch.safetensors"
    prompt[kinds["LoadImage"]]["inputs"]["image"] = "photo.png"
    prompt[kinds["KSampler"]]["inputs"]["steps"] = 2
    crop_inputs = prompt[kinds["PainterNetCrop"]]["inputs"]
    crop_inputs["resolution"] = 128
    pad = prompt[kinds["ImagePadForOutpaint"]]["inputs"]
    assert (pad["left"], pad["top"], pad["bottom"], pad["feathering"]) == (0, 0, 0, 0) and pad["right"] > 0
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", error_text(entry)
    out = saved_pixels(server, entry, kinds["SaveImage"])
    original = np.asarray(Image.open(os.path.join(server.input_dir, "photo.png")).convert("RGB"))
    assert out.shape == (HEIGHT, WIDTH + pad["right"], 3)
    keep = WIDTH - crop_inputs["grow"] - crop_inputs["feather"] - 1
    assert np.array_equal(out[:, :keep], original[:, :keep])
    assert (out[:, WIDTH:] != np.uint8(255.0 * 0.5)).mean() > 0.5  # the grey padding (0.5) was painted over
    off = server.run(branch_off(prompt))
    assert off["status"]["status_str"] == "success", error_text(off)
    hole, kept = np.zeros(out.shape[:2], bool), np.zeros(out.shape[:2], bool)
    hole[:, WIDTH:], kept[:, :keep] = True, True
    problems = branch_problems(out, saved_pixels(server, off, kinds["SaveImage"]), hole, kept, 0)
    assert not problems, "; ".join(problems)


def crop_graph(mask: list | None = None, image: list | None = None, stitch_image: list | None = None,
               resolution: int = 64, extra: dict | None = None) -> dict[str, Any]:
    """LoadImage → PainterNetCrop → PainterNetStitch (of the unchanged crop) → PreviewImage; no model needed."""
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "2": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": WIDTH, "height": HEIGHT}},
        "3": {"class_type": "CropMask", "inputs": {"mask": ["2", 0], "x": 100, "y": 80, "width": 60,
                                                   "height": 40}},
        "4": {"class_type": "PainterNetCrop", "inputs": {
            "image": image or ["1", 0], "mask": mask or ["5", 0], "resolution": resolution, "context": 0.5,
            "grow": 4, "feather": 8}},
        "5": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": WIDTH, "height": HEIGHT}},
        "6": {"class_type": "PainterNetStitch", "inputs": {"stitch": ["4", 2], "image": stitch_image or ["4", 0],
                                                           "blend": "poisson", "color_match": "mean_std"}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }
    prompt.update(extra or {})
    return prompt


def valid_hole_graph() -> dict[str, Any]:
    """A drawn box hole through the box-mask node, then crop → stitch."""
    shapes = json.dumps({"version": 1, "shapes": [{"type": "box", "x": 0.3, "y": 0.3, "w": 0.2, "h": 0.25}]})
    return crop_graph(mask=["8", 0], extra={"8": {"class_type": "PainterNetBoxMask", "inputs": {
        "image": ["1", 0], "shapes": shapes, "invert": False}}})


BAD_GRAPHS = {
    "empty mask": (crop_graph(), "PainterNetCrop: the mask is empty: nothing to inpaint. Paint the region"),
    "mask of another size": (crop_graph(mask=["3", 0]),
                             f"PainterNetCrop: mask is 60x40 but the image is {WIDTH}x{HEIGHT}; use a mask drawn"),
    "mask batch differs": (crop_graph(image=["9", 0], mask=["10", 0], extra={
        "9": {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 2}},
        "11": {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 3}},
        "10": {"class_type": "ImageToMask", "inputs": {"image": ["11", 0], "channel": "red"}}}),
        "PainterNetCrop: mask batch 3 does not match image batch 2; give one mask for all images or one per image"),
    "stitch of another crop (size)": (None, "PainterNetStitch: image is"),
    "stitch of another crop (batch)": (None, "PainterNetStitch: image batch 2 does not match the 1 crop(s)"),
}


@pytest.mark.parametrize("case", list(BAD_GRAPHS))
def test_bad_inputs_fail_clearly_and_the_server_goes_on(server, case):
    graph, message = BAD_GRAPHS[case]
    if case == "stitch of another crop (size)":
        graph = valid_hole_graph()
        graph["12"] = {"class_type": "PainterNetCrop", "inputs": {
            "image": ["1", 0], "mask": ["8", 0], "resolution": 128, "context": 0.5, "grow": 4, "feather": 8}}
        graph["6"]["inputs"]["image"] = ["12", 0]
    elif case == "stitch of another crop (batch)":
        graph = valid_hole_graph()
        graph["12"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["4", 0], "amount": 2}}
        graph["6"]["inputs"]["image"] = ["12", 0]
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "error"
    assert message in error_text(entry), error_text(entry)
    entry = server.run(valid_hole_graph())
    assert entry["status"]["status_str"] == "success", error_text(entry)


def test_feathered_mask_through_crop_apply_diffdiff_stitch_keeps_the_photo(server):
    """Crop → Apply → DifferentialDiffusion → KSampler → Stitch with a feathered mask (the box blurred by ComfyUI's
    ImageBlur): the crop's mask keeps the soft edge (saved as a preview), the photo outside grow + feather of the
    hole (mask > 0.5) is unchanged pixel for pixel, and the hole is repainted."""
    shapes = json.dumps({"version": 1, "shapes": [{"type": "box", "x": 0.3, "y": 0.3, "w": 0.25, "h": 0.3}]})
    grow, feather = 4, 16
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "2": {"class_type": "PainterNetBoxMask", "inputs": {"image": ["1", 0], "shapes": shapes, "invert": False}},
        "3": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 0]}},
        "4": {"class_type": "ImageBlur", "inputs": {"image": ["3", 0], "blur_radius": 8, "sigma": 3.0}},
        "5": {"class_type": "ImageToMask", "inputs": {"image": ["4", 0], "channel": "red"}},
        "6": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
        "7": {"class_type": "PainterNetLoader", "inputs": {"painternet_name": "tiny-sd15-branch.safetensors",
                                                           "dtype": "auto"}},
        "8": {"class_type": "PainterNetCrop", "inputs": {"image": ["1", 0], "mask": ["5", 0], "resolution": 128,
                                                         "context": 0.5, "grow": grow, "feather": feather,
                                                         "painternet": ["7", 0]}},
        "9": {"class_type": "CLIPTextEncode", "inputs": {"text": "a wall", "clip": ["6", 1]}},
        "10": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["6", 1]}},
        "11": {"class_type": "PainterNetApply", "inputs": {
            "model": ["6", 0], "vae": ["6", 2], "image": ["8", 0], "mask": ["8", 1], "painternet": ["7", 0],
            "positive": ["9", 0], "negative": ["10", 0], "scale": 1.0, "start_percent": 0.0, "end_percent": 1.0,
            "noise_mask": "soft"}},
        "12": {"class_type": "DifferentialDiffusion", "inputs": {"model": ["11", 0]}},
        "13": {"class_type": "KSampler", "inputs": {
            "model": ["12", 0], "seed": 3, "steps": 2, "cfg": 3.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["11", 1], "negative": ["11", 2], "latent_image": ["11", 3], "denoise": 1.0}},
        "14": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["6", 2]}},
        "15": {"class_type": "PainterNetStitch", "inputs": {"stitch": ["8", 2], "image": ["14", 0],
                                                            "blend": "feather", "color_match": "none"}},
        "16": {"class_type": "SaveImage", "inputs": {"images": ["15", 0], "filename_prefix": "soft"}},
        "17": {"class_type": "MaskToImage", "inputs": {"mask": ["8", 1]}},
        "18": {"class_type": "SaveImage", "inputs": {"images": ["17", 0], "filename_prefix": "soft_crop_mask"}},
        "19": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "soft_mask"}},
    }
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", error_text(entry)
    crop_mask = saved_pixels(server, entry, "18")[..., 0]
    assert ((crop_mask > 0) & (crop_mask < 255)).sum() > 100  # the soft edge survived the crop
    soft = saved_pixels(server, entry, "19")[..., 0]  # SaveImage truncates: u8 = floor(255 * value)
    assert ((soft > 0) & (soft < 255)).sum() > 100
    out = saved_pixels(server, entry, "16")
    original = np.asarray(Image.open(os.path.join(server.input_dir, "photo.png")).convert("RGB"))
    hole_or_more = soft >= 127  # every value > 0.5 (and a few just below)
    r = grow + feather
    band = cv2.dilate(hole_or_more.astype(np.uint8), np.ones((2 * r + 1, 2 * r + 1), np.uint8)) > 0
    assert np.array_equal(out[~band], original[~band])
    hole = soft >= 128
    assert (out[hole] != original[hole]).any()
