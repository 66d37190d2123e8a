"""Saved workflows keep loading and running on the V3 nodes: every graph in example_workflows/ and one saved with the
pack's V1 nodes (tests/data/v1_saved_workflow.json: every node of the pack, non-default widget values in V1 widget
order) go through a real `main.py --cpu` server, converted the way the browser converts them. Each runs with the tiny
SD1.5 test models (the SDXL graphs too: what is under test is the graph and its widgets, not the family) and must
repaint the hole of the input photo."""
from __future__ import annotations

import glob
import json
import os
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from harness.server import error_text, start_sd15_server, ui_to_api

pytestmark = pytest.mark.server

WIDTH, HEIGHT = 96, 80
HOLE = (slice(24, 56), slice(32, 72))
# The PowerPaint graphs need its task encoder and run in tests/test_powerpaint_server.py.
WORKFLOWS = sorted(glob.glob(os.path.join(REPO, "example_workflows", "painternet_*.json")))
V1_SAVED = os.path.join(REPO, "tests", "data", "v1_saved_workflow.json")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_sd15_server(str(tmp_path_factory.mktemp("comfy-workflows")))
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    rgb = np.stack([xx * 255 // WIDTH, yy * 255 // HEIGHT, (xx + yy) % 256], axis=-1).astype(np.uint8)
    # LoadImage's MASK is 1 - alpha: the transparent rectangle is the hole the whole-image workflows inpaint.
    alpha = np.full((HEIGHT, WIDTH), 255, np.uint8)
    alpha[HOLE] = 0
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(os.path.join(srv.input_dir, "photo.png"))
    yield srv
    srv.stop()


def runnable(graph: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """The browser's API prompt for `graph`, pointed at the test models and cut to a CI budget (2 steps, 128² crops);
    nothing else in the graph changes."""
    prompt = ui_to_api(graph, info)
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = "tiny-sd15.safetensors"
        elif kind == "PainterNetLoader":
            inputs["painternet_name"] = "tiny-sd15-branch.safetensors"
        elif kind == "LoadImage":
            inputs["image"] = "photo.png"
        elif kind == "KSampler":
            inputs["steps"] = 2
        elif kind == "PainterNetCrop":
            inputs["resolution"] = 128
        elif kind == "ImagePadForOutpaint":
            inputs["right"] = 32
    return prompt


def saved_image(server, entry: dict[str, Any]) -> np.ndarray:
    (images,) = [out["images"] for out in entry["outputs"].values() if out.get("images") and
                 out["images"][0]["type"] == "output"]
    path = os.path.join(server.output_dir, images[0]["subfolder"], images[0]["filename"])
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def run_and_check_the_hole(server, graph: dict[str, Any]) -> np.ndarray:
    entry = server.run(runnable(graph, server.object_info()))
    assert entry["status"]["status_str"] == "success", error_text(entry)
    out = saved_image(server, entry)
    with Image.open(os.path.join(server.input_dir, "photo.png")) as im:
        photo = np.asarray(im.convert("RGB")).astype(np.int16)
    assert out.shape[0] == HEIGHT and out.shape[1] >= WIDTH
    assert np.abs(out[HOLE] - photo[HOLE]).max() > 0, "the hole was not repainted"
    return out


@pytest.mark.parametrize("path", WORKFLOWS, ids=[os.path.basename(p) for p in WORKFLOWS])
def test_every_example_workflow_loads_and_runs(server, path):
    with open(path, encoding="utf-8") as fh:
        graph = json.load(fh)
    run_and_check_the_hole(server, graph)


def test_workflow_saved_with_the_v1_nodes_loads_and_runs(server):
    with open(V1_SAVED, encoding="utf-8") as fh:
        graph = json.load(fh)
    info = server.object_info()
    prompt = ui_to_api(graph, info)
    by_type = {node["class_type"]: node["inputs"] for node in prompt.values()}
    assert {k for k in by_type if k.startswith("PainterNet")} == {
        "PainterNetLoader", "PainterNetApply", "PainterNetMaskGenerator", "PainterNetBoxMask", "PainterNetCrop",
        "PainterNetStitch"}
    # Every widget value lands on the input it was saved for (the values were written with the V1 nodes).
    expected = {
        "PainterNetLoader": {"painternet_name": "painternet_sd15.safetensors", "dtype": "fp32"},
        "PainterNetApply": {"scale": 0.8, "start_percent": 0.0, "end_percent": 0.9},
        "PainterNetCrop": {"resolution": 0, "context": 0.4, "grow": 6, "feather": 12, "context_min": 32},
        "PainterNetStitch": {"blend": "laplacian", "color_match": "none"},
        "PainterNetBoxMask": {"invert": False},
        "PainterNetMaskGenerator": {
            "mode": "irregular", "seed": 7, "box_expand_min": 0.05, "box_expand_max": 0.2, "dilation_scale": 1.5,
            "strokes_min": 2, "strokes_max": 3, "segments_min": 1, "segments_max": 4, "length_min": 0.1,
            "length_max": 0.2, "width_min": 0.03, "width_max": 0.05, "line_weight": 0.5, "circle_weight": 0.25,
            "square_weight": 0.25},
    }
    for node, values in expected.items():
        assert {k: by_type[node][k] for k in values} == values, node
    assert run_and_check_the_hole(server, graph).shape == (HEIGHT, WIDTH, 3)


def test_server_serves_the_node_help_and_the_locales_where_the_frontend_reads_them(server):
    """The frontend's node-help panel fetches /extensions/<pack>/docs/<node>.md (its pictures relative to it) and
    its translations from /i18n: both answer from the pack's files."""
    import requests

    base = f"{server.url}/extensions/ComfyUI-PainterNet/docs"
    page = requests.get(f"{base}/PainterNetApply.md", timeout=30)
    assert page.status_code == 200 and page.text.startswith("# Apply PainterNet"), page.status_code
    picture = requests.get(f"{base}/crop_box.png", timeout=30)
    assert picture.status_code == 200 and picture.content[:8] == b"\x89PNG\r\n\x1a\n"
    i18n = requests.get(f"{server.url}/i18n", timeout=30).json()
    assert i18n["zh"]["nodeDefs"]["PainterNetApply"]["display_name"] == "应用 PainterNet"
    assert i18n["en"]["nodeDefs"]["PainterNetCrop"]["inputs"]["feather"]["tooltip"]
