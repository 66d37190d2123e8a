"""Tier 3 end to end: a user's workflow through a real `main.py --cpu` server via POST /prompt."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from harness.server import (add_branch_checks, branch_off, decoded_branch_problems, error_text, saved_pixels,
                            start_sd15_server)

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_sd15_server(str(tmp_path_factory.mktemp("comfy")))
    # A 64x48 RGBA picture whose transparent rectangle is the hole (LoadImage's mask = 1 - alpha).
    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[..., 0] = np.linspace(0, 255, 64, dtype=np.uint8)[None]
    rgba[..., 1] = 120
    rgba[..., 3] = 255
    rgba[16:32, 20:44, 3] = 0
    Image.fromarray(rgba, "RGBA").save(os.path.join(srv.input_dir, "cat.png"))
    yield srv
    srv.stop()


def inpaint_workflow(mask_mode: str = "box", branch: str = "tiny-sd15-branch.safetensors", cfg: float = 2.0,
                     prefix: str = "painternet") -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red apple", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "cat.png"}},
        "5": {"class_type": "PainterNetLoader", "inputs": {"painternet_name": branch, "dtype": "auto"}},
        "10": {"class_type": "PainterNetMaskGenerator", "inputs": {"mask": ["4", 1], "mode": mask_mode, "seed": 3}},
        "6": {"class_type": "PainterNetApply", "inputs": {
            "model": ["1", 0], "vae": ["1", 2], "image": ["4", 0], "mask": ["10", 0], "painternet": ["5", 0],
            "positive": ["2", 0], "negative": ["3", 0], "scale": 1.0, "start_percent": 0.0, "end_percent": 1.0}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["6", 0], "seed": 7, "steps": 2, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["6", 1], "negative": ["6", 2], "latent_image": ["6", 3], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}},
    }


def test_object_info_lists_the_nodes(server):
    info = server.object_info()
    for node in ("PainterNetLoader", "PainterNetApply", "PainterNetMaskGenerator"):
        assert node in info
        assert info[node]["category"] == "inpaint/PainterNet"
    assert "tiny-sd15-branch.safetensors" in info["PainterNetLoader"]["input"]["required"]["painternet_name"][1]["options"]


def test_inpaint_workflow_saves_an_image_the_branch_changed(server):
    """The workflow runs, and the branch acts in it: the same graph at scale 0 gives another hole and (up to the
    decoder's reach) the same picture elsewhere."""
    prompt = inpaint_workflow()
    add_branch_checks(prompt, ["4", 0], ["10", 0], ["7", 0], ["1", 2], "painternet")
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", error_text(entry)
    assert saved_pixels(server, entry, "9").shape == (48, 64, 3)
    off = server.run(branch_off(prompt))
    assert off["status"]["status_str"] == "success", error_text(off)
    problems = decoded_branch_problems(server, entry, off)
    assert not problems, "; ".join(problems)


def test_pickle_branch_is_refused_with_conversion_hint(server):
    import torch

    # A real pickle: the loader goes by content, so a safetensors file renamed .ckpt would load.
    torch.save({"state_dict": {"w": torch.zeros(2)}}, os.path.join(server.models("painternet"), "old.ckpt"))
    entry = server.run(inpaint_workflow(branch="old.ckpt", prefix="pickle"))
    assert entry["status"]["status_str"] == "error"
    assert "pickle" in error_text(entry) and "safetensors" in error_text(entry)
    # The server is still alive and the next valid prompt succeeds.
    assert server.run(inpaint_workflow(prefix="after"))["status"]["status_str"] == "success"


@pytest.mark.parametrize("name", ["painternet_sd15_inpaint.json", "painternet_sdxl_inpaint.json"])
def test_example_workflows_match_the_server_nodes(server, name):
    import json

    from conftest import REPO

    info = server.object_info()
    graph = json.load(open(os.path.join(REPO, "example_workflows", name), encoding="utf-8"))
    nodes = {n["id"]: n for n in graph["nodes"]}
    for node in nodes.values():
        assert node["type"] in info, node["type"]
        spec = info[node["type"]]
        assert [o["type"] for o in node["outputs"]] == spec["output"]
        required = spec["input"]["required"]
        linked = [i["name"] for i in node["inputs"]]
        assert set(linked) <= set(required)
        widgets = [k for k in required if k not in linked]
        seeds = sum(1 for k in widgets if required[k][1].get("control_after_generate"))
        assert len(node["widgets_values"]) == len(widgets) + seeds + (1 if node["type"] == "LoadImage" else 0)
    for link_id, src, src_slot, dst, dst_slot, kind in graph["links"]:
        assert info[nodes[src]["type"]]["output"][src_slot] == kind
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
