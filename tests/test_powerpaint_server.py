"""PowerPaint v2 through a real `main.py --cpu` server: the object-removal and outpainting example workflows run end
to end on tiny models found through the `inpaint:` and `text_encoders:` keys of extra_model_paths.yaml (where a
ComfyUI-BrushNet user has them); the outpainted image has the padded size and the original's pixels away from the band. Bad inputs fail with
one line naming the fix, and the server answers a valid prompt afterwards."""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from harness.models import branch_file, cached_path, clip_text_encoder_file, powerpaint_branch_file, sd15_checkpoint
from harness.server import error_text, load_workflow, start_server, ui_to_api, workflow_prompt

pytestmark = pytest.mark.server

WORKFLOWS = ("powerpaint_sd15_object_removal.json", "powerpaint_sd15_outpaint.json",
             "powerpaint_sd15_shape_guided.json")
HEIGHT, WIDTH = 48, 64
BRANCH = "PowerPaint_Brushnet/diffusion_pytorch_model.safetensors"
ENCODER = "powerpaint_brushnet_text_encoder_fp16.safetensors"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(str(tmp_path_factory.mktemp("comfy-powerpaint")))
    os.makedirs(os.path.join(srv.models("inpaint"), "PowerPaint_Brushnet"), exist_ok=True)
    os.symlink(sd15_checkpoint(), os.path.join(srv.models("checkpoints"), "tiny-sd15.safetensors"))
    os.symlink(powerpaint_branch_file(), os.path.join(srv.models("inpaint"), BRANCH))
    os.symlink(clip_text_encoder_file(cached_path("tiny-powerpaint-text-encoder.safetensors")),
               os.path.join(srv.models("text_encoders"), ENCODER))
    os.symlink(branch_file("sd15", "tiny-sd15-320-branch.safetensors"),
               os.path.join(srv.models("painternet"), "tiny-painternet.safetensors"))
    rgba = np.zeros((HEIGHT, WIDTH, 4), np.uint8)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = xx * 4, yy * 5, (xx + yy) % 256
    rgba[..., 3] = 255
    rgba[16:32, 20:44, 3] = 0  # the transparent rectangle is LoadImage's mask: the object to remove
    Image.fromarray(rgba, "RGBA").save(os.path.join(srv.input_dir, "room.png"))
    Image.fromarray(rgba[..., :3], "RGB").save(os.path.join(srv.input_dir, "wall.png"))
    yield srv
    srv.stop()


def _prompt(server, name: str, image: str = "room.png") -> tuple[dict[str, Any], dict[str, str]]:
    prompt = ui_to_api(load_workflow(name), server.object_info())
    kinds = {n["class_type"]: k for k, n in prompt.items()}
    prompt[kinds["CheckpointLoaderSimple"]]["inputs"]["ckpt_name"] = "tiny-sd15.safetensors"
    assert prompt[kinds["PainterNetLoader"]]["inputs"]["painternet_name"] == BRANCH
    assert prompt[kinds["PowerPaintTaskEncoder"]]["inputs"]["text_encoder_name"] == ENCODER
    prompt[kinds["LoadImage"]]["inputs"]["image"] = image
    prompt[kinds["KSampler"]]["inputs"]["steps"] = 2  # CI budget; the graph is unchanged
    return prompt, kinds


def _saved(server, entry: dict[str, Any], node: str) -> np.ndarray:
    image = entry["outputs"][node]["images"][0]
    with Image.open(os.path.join(server.output_dir, image["subfolder"], image["filename"])) as im:
        return np.asarray(im.convert("RGB"))


def _original() -> np.ndarray:
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    return np.stack([xx * 4, yy * 5, (xx + yy) % 256], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflows_match_the_server_nodes(server, name):
    info = server.object_info()
    graph = load_workflow(name)
    prompt = workflow_prompt(graph, info)
    apply = next(n for n in prompt.values() if n["class_type"] == "PowerPaintApply")
    encode = next(n for n in prompt.values() if n["class_type"] == "PowerPaintTextEncode")
    assert apply["inputs"]["task"] == encode["inputs"]["task"] == name.split("sd15_")[1][:-5].replace("_", "-") \
        .replace("outpaint", "outpainting")
    assert BRANCH in info["PainterNetLoader"]["input"]["required"]["painternet_name"][1]["options"]


def test_object_removal_workflow_runs(server):
    prompt, kinds = _prompt(server, "powerpaint_sd15_object_removal.json")
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", error_text(entry)
    out = _saved(server, entry, kinds["SaveImage"])
    assert out.shape == (HEIGHT, WIDTH, 3)
    # With the branch off (scale 0) the same seed gives another picture: the branch acts.
    prompt[kinds["PowerPaintApply"]]["inputs"]["scale"] = 0.0
    prompt[kinds["SaveImage"]]["inputs"]["filename_prefix"] = "removal_scale0"
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", error_text(entry)
    assert not np.array_equal(_saved(server, entry, kinds["SaveImage"]), out)


def test_outpaint_workflow_extends_the_picture(server):
    prompt, kinds = _prompt(server, "powerpaint_sd15_outpaint.json", image="wall.png")  # opaque: no inner holes
    pad = prompt[kinds["PainterNetOutpaintPad"]]["inputs"]
    assert (pad["left"], pad["top"], pad["bottom"], pad["band"]) == (0, 0, 0, 10) and pad["right"] > 0
    pad["right"] = 32  # CI budget
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", error_text(entry)
    out = _saved(server, entry, kinds["SaveImage"])
    assert out.shape == (HEIGHT, WIDTH + 32, 3)
    keep = WIDTH - pad["band"] - pad["feather"]
    assert np.array_equal(out[:, :keep], _original()[:, :keep])
    assert (out[:, WIDTH:] != 127).any()  # the padding was painted over


FIX = "powerpaint_brushnet_text_encoder_fp16.safetensors"


@pytest.mark.parametrize("what, match, fix", [
    ("painternet branch", "is a painternet branch, not PowerPaint v2", "use Apply PainterNet"),
    ("stock encoder", "without PowerPaint's 30 task-token rows", FIX),
    ("clip-g", "SDXL CLIP-G text encoder", FIX),
    ("pickle", "pickle", "st.save_file"),
])
def test_bad_input_one_line_naming_the_fix(server, what, match, fix):
    prompt, kinds = _prompt(server, "powerpaint_sd15_object_removal.json")
    encoder = prompt[kinds["PowerPaintTaskEncoder"]]["inputs"]
    folder = server.models("text_encoders")
    if what == "painternet branch":
        prompt[kinds["PainterNetLoader"]]["inputs"]["painternet_name"] = "tiny-painternet.safetensors"
    elif what == "stock encoder":
        clip_text_encoder_file(os.path.join(folder, "clip_l_stock.safetensors"), vocab=49408, width=64)
        encoder["text_encoder_name"] = "clip_l_stock.safetensors"
    elif what == "clip-g":
        from safetensors.torch import save_file

        shapes = {"text_model.embeddings.token_embedding.weight": (16, 1280),
                  "text_model.embeddings.position_embedding.weight": (77, 1280),
                  "text_model.encoder.layers.0.self_attn.q_proj.weight": (1280, 1280)}
        save_file({k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()},
                  os.path.join(folder, "clip_g.safetensors"))
        encoder["text_encoder_name"] = "clip_g.safetensors"
    else:
        with open(os.path.join(server.models("inpaint"), "pytorch_model.bin"), "wb") as fh:
            fh.write(b"\x80\x04\x95" + b"\x00" * 64)
        encoder["text_encoder_name"] = "pytorch_model.bin"
    prompt[kinds["SaveImage"]]["inputs"]["filename_prefix"] = "bad"
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "error"
    text = error_text(entry)
    assert match in text and fix in text and "\n" not in text.strip()
    good, good_kinds = _prompt(server, "powerpaint_sd15_object_removal.json")
    good[good_kinds["SaveImage"]]["inputs"]["filename_prefix"] = "after"
    assert server.run(good)["status"]["status_str"] == "success"
