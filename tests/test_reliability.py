"""Reliability under real use, through a real `main.py --cpu` server (issue 8).

- Soak: many queued prompts with varying seeds, masks and scales, a checkpoint swap and a branch swap (and back), one
  prompt interrupted with `POST /interrupt`; the server's resident memory at the end must stay within
  `RSS_MARGIN_BYTES` of its level after the first `BASELINE_PROMPTS` prompts, ComfyUI must never log "Potential memory
  leak", and every prompt must succeed or (the interrupted one) report the interruption.
- Bad-input matrix: every case ends in its documented result (clear error text or a correct image) and the next
  valid prompt succeeds on the same server.
- Compatibility guard: every patch and wrapper accepts (and the wrapper forwards) keyword arguments a newer ComfyUI
  may add.

`PAINTERNET_SOAK_PROMPTS` sets the soak length (12 by default; `bench/soak.py` runs 50 with the same functions,
which live in `harness/soak.py`).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from typing import Any, Callable

import numpy as np
import pytest
import requests
import torch

from harness.models import branch_file
from harness.server import ComfyServer, branch_off, decoded_branch_problems, error_text, saved_pixels
from harness.soak import (BASELINE_PROMPTS, BRANCH_A, BRANCH_SDXL, HEIGHT, LEAK_TEXT, REPEAT_TOLERANCE,
                          RSS_MARGIN_BYTES, WIDTH, Ref, inpaint_prompt, loaded_image, outcome, rect_mask, run_soak,
                          saved_images, setup_server, soak_problems, solid_mask)

SOAK_PROMPTS = int(os.environ.get("PAINTERNET_SOAK_PROMPTS", "12"))


# ------------------------------------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = setup_server(str(tmp_path_factory.mktemp("reliability")))
    yield srv
    srv.stop()


# The valid prompts alternate between these two (seed, scale): consecutive valid prompts always differ, and no bad
# case uses either, so the sampler and Apply really run again instead of coming from ComfyUI's cache.
VALID_SETTINGS = ((5001, 0.7), (5002, 1.3))
_valid_turn = iter(range(10**6))


@pytest.fixture(scope="module")
def references(server) -> dict[tuple[int, float], Any]:
    """The reference run of each valid prompt on the fresh server, before any bad input, and the proof that the
    branch acts in it: the same graph at scale 0 changes the hole by the stated margin and leaves the rest alone."""
    refs = {}
    for seed, scale in VALID_SETTINGS:
        prompt = inpaint_prompt(seed=seed, scale=scale, steps=1, prefix="reference", checks=True)
        on, off = server.run(prompt), server.run(branch_off(prompt))
        assert outcome(on) == outcome(off) == "success", f"{outcome(on)} / {outcome(off)}"
        problems = decoded_branch_problems(server, on, off)
        assert not problems, f"seed {seed} scale {scale}: " + "; ".join(problems)
        refs[seed, scale] = saved_pixels(server, on, "9")
    return refs


def assert_next_valid_prompt_succeeds(server: ComfyServer, references: dict[tuple[int, float], Any]) -> None:
    """The next valid prompt succeeds and gives the picture of its reference run: a bad input left no state behind
    (patches, a half-loaded branch, a changed model) that changes what a good prompt computes."""
    seed, scale = VALID_SETTINGS[next(_valid_turn) % len(VALID_SETTINGS)]
    entry = server.run(inpaint_prompt(seed=seed, scale=scale, steps=1, prefix="valid", checks=True))
    assert outcome(entry) == "success", f"the valid prompt after the case failed: {outcome(entry)}"
    (pixels,) = saved_images(server, entry)
    diff = np.abs(pixels.astype(np.int16) - references[seed, scale].astype(np.int16)).max()
    assert diff <= REPEAT_TOLERANCE, f"the valid prompt differs from its reference run by up to {diff} levels"


@pytest.mark.server
def test_soak_memory_stays_flat_and_every_prompt_finishes(server, references):
    records = run_soak(server, SOAK_PROMPTS)
    problems = soak_problems(server, records)
    assert not problems, "\n".join(problems)
    assert sum(r.outcome == "interrupted" for r in records) == 1
    # The output checks ran on real pairs: a repeat of an earlier prompt and the branch-off twin of the first.
    assert any(r.extra["same_as"] is not None for r in records)
    assert any(r.extra["branch_off_of"] is not None for r in records)
    assert_next_valid_prompt_succeeds(server, references)


def _write_bad_branches(server: ComfyServer) -> None:
    folder = server.models("painternet")
    good = os.path.join(folder, BRANCH_A)
    with open(os.path.join(folder, "corrupt.safetensors"), "wb") as fh:
        fh.write(b"this is not a safetensors file at all\n" * 64)
    with open(good, "rb") as src, open(os.path.join(folder, "truncated.safetensors"), "wb") as dst:
        dst.write(src.read(os.path.getsize(good) * 3 // 5))
    torch.save({"state_dict": {"w": torch.zeros(2)}}, os.path.join(folder, "old.ckpt"))
    # A pickle renamed to .safetensors: the extension must not fool the loader.
    torch.save({"w": torch.zeros(2)}, os.path.join(folder, "disguised.safetensors"))
    if not os.path.exists(os.path.join(folder, BRANCH_SDXL)):
        os.symlink(branch_file("sdxl", "tiny-sdxl-320-branch.safetensors"), os.path.join(folder, BRANCH_SDXL))
    if not os.path.exists(os.path.join(folder, "header-0x80.safetensors")):
        _rewrite_with_header_low_byte(good, os.path.join(folder, "header-0x80.safetensors"), 0x80)
    from painternet_core.config import SD15_UNET, PainterNetConfig

    # ~1 KB each: a config outside the bounds, and one inside them describing a 37 GB branch its tensors do not hold.
    lies = {"lying-config.safetensors": dict(json.loads(PainterNetConfig(family="sd15", unet=SD15_UNET).to_json()),
                                             unet=dict(SD15_UNET, layers_per_block=4000)),
            "lying-shapes.safetensors": json.loads(PainterNetConfig(family="sd15", unet=dict(
                SD15_UNET, block_out_channels=[4096] * 4, layers_per_block=2, transformer_layers_per_block=1,
                attention_head_dim=64, cross_attention_dim=8192)).to_json())}
    for name, config in lies.items():
        header = json.dumps({"__metadata__": {"painternet_format": "1", "painternet_config": json.dumps(config)},
                             "conv_in.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(struct.pack("<Q", len(header)) + header + b"\0" * 4)


def _rewrite_with_header_low_byte(src: str, dst: str, low_byte: int) -> None:
    """The same branch with metadata padding chosen so the header length's low byte (the file's first byte) is
    `low_byte`: what 1 in 32 exports get by chance."""
    with open(src, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        header["__metadata__"]["padding"] = ""
        base = len(json.dumps(header).encode())
        header["__metadata__"]["padding"] = " " * ((low_byte - base) % 256)
        text = json.dumps(header).encode()
        assert len(text) % 256 == low_byte
        with open(dst, "wb") as out:
            out.write(struct.pack("<Q", len(text)) + text)
            shutil.copyfileobj(fh, out)


def _batch_mask(nodes: dict[str, Any], amount: int) -> Ref:
    ref = rect_mask(nodes, WIDTH, HEIGHT, (8, 8, 24, 16))
    nodes["40"] = {"class_type": "MaskToImage", "inputs": {"mask": ref}}
    nodes["41"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["40", 0], "amount": amount}}
    nodes["42"] = {"class_type": "ImageToMask", "inputs": {"image": ["41", 0], "channel": "red"}}
    return ["42", 0]


def _batch_image(nodes: dict[str, Any], amount: int) -> Ref:
    ref = loaded_image(nodes)
    nodes["43"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ref, "amount": amount}}
    return ["43", 0]


def _empty_image(nodes: dict[str, Any], width: int, height: int) -> Ref:
    nodes["44"] = {"class_type": "EmptyImage", "inputs": {"width": width, "height": height, "batch_size": 1,
                                                          "color": 0x808080}}
    return ["44", 0]


def _box_mask(text: str) -> Callable[[dict[str, Any]], Ref]:
    """The mask drawn by PainterNetBoxMask on soak.png, with `text` as its shapes widget."""
    def build(nodes: dict[str, Any]) -> Ref:
        nodes["52"] = {"class_type": "LoadImage", "inputs": {"image": "soak.png"}}
        nodes["53"] = {"class_type": "PainterNetBoxMask", "inputs": {"image": ["52", 0], "shapes": text,
                                                                     "invert": False}}
        return ["53", 0]
    return build


def _linked(node: str, name: str, value: float, kind: str = "PrimitiveFloat") -> Callable[[dict[str, Any]], None]:
    """Feed input `name` of node `node` from a primitive node: ComfyUI range-checks widgets, not links."""
    def edit(nodes: dict[str, Any]) -> None:
        nodes["54"] = {"class_type": kind, "inputs": {"value": value}}
        nodes[node]["inputs"][name] = ["54", 0]
    return edit


# 100 000 points zig-zagging across the image with the widest brush: within the point limit, over the work budget.
_OVER_BUDGET_SHAPES = json.dumps({"version": 1, "shapes": [{"type": "stroke", "width": 1.0, "points": [
    [i % 2, (i % 7) / 7] for i in range(100_000)]}]})


def _nan_image(nodes: dict[str, Any]) -> Ref:
    nodes["45"] = {"class_type": "LoadLatent", "inputs": {"latent": "nan.latent"}}
    nodes["46"] = {"class_type": "VAEDecode", "inputs": {"samples": ["45", 0], "vae": ["1", 2]}}
    return ["46", 0]


# (case id, prompt keyword arguments, expected: list of texts the error must contain, or (count, (w, h)) images)
BAD_INPUTS: list[tuple[str, dict[str, Any], Any]] = [
    ("wrong-family-branch", {"branch": BRANCH_SDXL}, ["branch is for SDXL", "model is SD15"]),
    ("corrupt-branch", {"branch": "corrupt.safetensors"}, ["corrupt.safetensors", "not a valid safetensors file"]),
    ("truncated-branch", {"branch": "truncated.safetensors"}, ["truncated.safetensors", "is truncated"]),
    ("pickle-branch", {"branch": "old.ckpt"}, ["pickle", "never loaded", "safetensors"]),
    ("pickle-renamed-safetensors", {"branch": "disguised.safetensors"}, ["pickle", "never loaded"]),
    ("mask-smaller-same-aspect", {"mask": lambda n: rect_mask(n, WIDTH // 2, HEIGHT // 2, (4, 4, 12, 8))},
     (1, (WIDTH, HEIGHT))),
    ("mask-other-aspect", {"mask": lambda n: rect_mask(n, WIDTH, WIDTH, (4, 4, 12, 8))},
     ["mask is 64x64", "image is 64x48", "different aspect ratio"]),
    ("mask-batch-2-image-batch-1", {"mask": lambda n: _batch_mask(n, 2)},
     ["mask batch 2 does not match image batch 1"]),
    ("mask-batch-1-image-batch-2", {"image": lambda n: _batch_image(n, 2)}, (2, (WIDTH, HEIGHT))),
    ("mask-all-zero", {"mask": lambda n: solid_mask(n, 0.0, WIDTH, HEIGHT)}, ["mask is empty"]),
    ("mask-all-one", {"mask": lambda n: solid_mask(n, 1.0, WIDTH, HEIGHT)}, (1, (WIDTH, HEIGHT))),
    ("image-1x1", {"image": lambda n: _empty_image(n, 1, 1), "mask": lambda n: solid_mask(n, 1.0, 1, 1)},
     ["image is 1x1 px", "at least 8x8 px"]),
    ("image-67x45-cropped", {"image": lambda n: loaded_image(n, (67, 45)),
                             "mask": lambda n: rect_mask(n, 67, 45, (10, 10, 30, 20))}, (1, (64, 40))),
    ("image-nan", {"image": _nan_image}, ["image contains NaN"]),
    # Issue 12: hostile and unlucky inputs.
    ("branch-header-low-byte-0x80", {"branch": "header-0x80.safetensors"}, (1, (WIDTH, HEIGHT))),  # = BRANCH_A
    ("branch-config-out-of-bounds", {"branch": "lying-config.safetensors"},
     ["lying-config.safetensors", "layers_per_block=4000 must be an integer in [1, 4]"]),
    ("branch-config-lies-about-tensors", {"branch": "lying-shapes.safetensors"},
     ["lying-shapes.safetensors", "missing keys", "another topology"]),
    ("scale-nan", {"scale": float("nan")}, ["scale=nan must be a finite number"]),
    ("scale-linked-negative", {"edit": _linked("6", "scale", -5.0)}, ["scale=-5.0 is outside [0.0, 10.0]"]),
    ("strokes-max-linked-1e9", {"mask_mode": "irregular", "edit": _linked("10", "strokes_max", 10**9, "PrimitiveInt")},
     ["strokes_max=1000000000 is outside [0, 64]"]),
    ("shapes-over-4mb", {"mask": _box_mask(json.dumps([{"type": "box", "x": "j" * 4_800_000}]))},
     ["characters, more than 4194304"]),
    ("shapes-null-point", {"mask": _box_mask('{"version": 1, "shapes": [{"type": "stroke", "width": 0.1, '
                                             '"points": [null]}]}')}, ["points[0] must be an [x, y] pair, got None"]),
    ("shapes-over-work-budget", {"mask": _box_mask(_OVER_BUDGET_SHAPES)}, ["units of drawing work", "more than"]),
    ("shapes-box", {"mask": _box_mask('{"version": 1, "shapes": [{"type": "box", "x": 0.25, "y": 0.25, "w": 0.5, '
                                      '"h": 0.5}]}')}, (1, (WIDTH, HEIGHT))),  # = the default rectangle
]


# Succeeding cases that are another spelling of a plain prompt: their picture must equal that prompt's (same seed).
REFERENCE_KWARGS: dict[str, dict[str, Any]] = {
    "branch-header-low-byte-0x80": {"branch": BRANCH_A},  # the same tensors, only the header padding differs
    "shapes-box": {},  # the drawn box covers exactly the default rectangle (16, 12, 32, 24)
}


def _queue_allowing_nan(server: ComfyServer, prompt: dict[str, Any]) -> str:
    """POST /prompt like server.queue, but with NaN/Infinity written as JS literals, which ComfyUI's JSON parser
    accepts (requests refuses to write them): how an API client sends scale=NaN."""
    body = json.dumps({"prompt": prompt, "client_id": server.client_id}, allow_nan=True)
    r = requests.post(f"{server.url}/prompt", data=body, headers={"Content-Type": "application/json"}, timeout=60)
    if r.status_code != 200:
        raise RuntimeError(f"/prompt refused ({r.status_code}): {r.text[:2000]}")
    return r.json()["prompt_id"]


@pytest.mark.server
@pytest.mark.parametrize("case, kwargs, expected", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gives_documented_result_and_server_stays_usable(server, references, case, kwargs, expected):
    _write_bad_branches(server)
    kwargs = dict(kwargs)
    edit = kwargs.pop("edit", None)
    prompt = inpaint_prompt(seed=zlib.crc32(case.encode()) % 1000, prefix=case, **kwargs)
    if edit is not None:
        edit(prompt)
    entry = server.wait(_queue_allowing_nan(server, prompt))
    if isinstance(expected, list):
        assert entry["status"]["status_str"] == "error", f"{case} should fail but {outcome(entry)}"
        text = error_text(entry)
        for part in expected:
            assert part in text, f"{case}: {part!r} not in the error {text[:2000]!r}"
        # However large the bad input, the message quotes little of it (it travels to /history and every client).
        assert len(text) < 2000, f"{case}: a {len(text)}-character error message"
    else:
        count, (width, height) = expected
        assert outcome(entry) == "success", f"{case}: {outcome(entry)}"
        images = saved_images(server, entry)
        assert len(images) == count
        for pixels in images:
            assert pixels.shape == (height, width, 3)
        if case in REFERENCE_KWARGS:
            reference = server.run(inpaint_prompt(seed=zlib.crc32(case.encode()) % 1000, prefix=case + "-reference",
                                                  **REFERENCE_KWARGS[case]))
            (want,) = saved_images(server, reference)
            diff = np.abs(images[0].astype(np.int16) - want.astype(np.int16)).max()
            assert diff <= REPEAT_TOLERANCE, f"{case}: differs from its reference prompt by up to {diff} levels"
    assert_next_valid_prompt_succeeds(server, references)


@pytest.mark.server
def test_missing_branch_file_is_refused_by_name(server, references):
    with pytest.raises(RuntimeError) as refused:
        server.queue(inpaint_prompt(branch="does-not-exist.safetensors"))
    text = str(refused.value)
    assert "(400)" in text and "does-not-exist.safetensors" in text and "is not one of" in text
    # A file that was listed and then deleted is refused the same way: ComfyUI refreshes the list from the folder.
    folder = server.models("painternet")
    shutil.copy(os.path.join(folder, BRANCH_A), os.path.join(folder, "gone.safetensors"))
    assert "gone.safetensors" in server.object_info()["PainterNetLoader"]["input"]["required"]["painternet_name"][1]["options"]
    os.remove(os.path.join(folder, "gone.safetensors"))
    with pytest.raises(RuntimeError, match="gone.safetensors"):
        server.queue(inpaint_prompt(branch="gone.safetensors"))
    assert_next_valid_prompt_succeeds(server, references)


@pytest.mark.server
def test_no_leak_warning_after_the_matrix(server):
    assert LEAK_TEXT not in server.log()
    assert server.process.poll() is None


# ----------------------------------------------------------------------------------------- compatibility guard

class _FutureKwarg:
    """A keyword argument no ComfyUI passes today."""


FUTURE = {"painternet_future_option": _FutureKwarg()}


@pytest.fixture(scope="module")
def injection():
    from harness.comfy_helpers import pack_module

    return pack_module("nodes.injection")


def _residuals(layout, channels: int = 4):
    g = torch.Generator().manual_seed(0)
    down = [torch.randn(1, channels, 4, 4, generator=g) for _ in range(3)]
    up = [torch.randn(1, channels, 4, 4, generator=g) for _ in range(layout.n_up)]
    attention = {("output", 2, 0): torch.randn(1, 16, channels, generator=g)}
    return {"down": down, "mid": torch.randn(1, channels, 4, 4, generator=g), "up": up, "attention": attention,
            "layout": layout}


def _options(res: dict, **more) -> dict:
    """transformer_options carrying one apply's residual set at scale 1, as the DIFFUSION_MODEL wrapper leaves them."""
    from harness.comfy_helpers import pack_module

    return {pack_module("nodes.injection").RESIDUALS: [(res, 1.0)], **more}


def test_every_patch_accepts_unknown_keyword_arguments(injection):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import Upsample

    layout = injection.ComfyLayout(after_output={1: 0, 2: 1}, before_upsample={1: 2}, final=3, n_up=4)
    res = _residuals(layout)
    h = torch.randn(1, 4, 4, 4)
    options = _options(res, block=("input", 1))
    assert torch.equal(injection.input_block_patch(h, options, **FUTURE), h + res["down"][1])

    hsp = torch.randn(1, 4, 4, 4)
    out_h, out_hsp = injection.output_block_patch(h, hsp, dict(options, block=("output", 0)), **FUTURE)
    assert torch.equal(out_h, h + res["mid"]) and out_hsp is hsp
    out_h, _ = injection.output_block_patch(h, hsp, dict(options, block=("output", 2)), **FUTURE)
    assert torch.equal(out_h, h + res["up"][1])

    n = torch.randn(1, 16, 4)
    extra = _options(res, block=("output", 2), block_index=0)
    assert torch.equal(injection.attn2_output_patch(n, extra, **FUTURE), n + res["attention"][("output", 2, 0)])

    upsample = Upsample(4, True, dims=2, out_channels=4, operations=comfy.ops.disable_weight_init)
    torch.nn.init.normal_(upsample.conv.weight, generator=torch.Generator().manual_seed(1))
    torch.nn.init.zeros_(upsample.conv.bias)
    holder = injection.UpsampleHolder(upsample, point=2)
    got = injection.holder_patch(holder, h, None, None, options, output_shape=None, **FUTURE)
    with torch.no_grad():
        assert torch.allclose(got, upsample(h + res["up"][2]))
    marker = injection.ResidualMarker(point=3)
    assert torch.equal(injection.marker_patch(marker, h, None, None, options, **FUTURE), h + res["up"][3])
    assert torch.equal(marker(h, None, **FUTURE), h)
    assert torch.allclose(holder(h, output_shape=None, **FUTURE), upsample(h))
    # Without residuals every patch is the identity, extra keywords or not.
    assert injection.input_block_patch(h, {"block": ("input", 1)}, **FUTURE) is h
    assert injection.attn2_output_patch(n, {"block": ("output", 2)}, **FUTURE) is n


def test_wrapper_accepts_and_forwards_unknown_keyword_arguments(injection):
    from harness.comfy_helpers import comfy_model_config, pack_module
    from harness.models import fill_
    from painternet_core.branch import PainterNetBranch
    from painternet_core.config import TINY_SD15_UNET, PainterNetConfig

    import comfy.model_management as mm
    import comfy.model_patcher

    branch_mod = pack_module("nodes.branch")
    config = PainterNetConfig(family="sd15", unet=TINY_SD15_UNET)
    state = fill_(PainterNetBranch(config), 3, gain=0.3).state_dict()
    painternet = branch_mod.build_branch(state, config, dtype="fp32", name="tiny")
    model_config = comfy_model_config("sd15", branch_mod.comfy_unet_config(TINY_SD15_UNET, in_channels=4))
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    fill_(base.diffusion_model, 4)
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    layout = injection.install_layout(patcher.clone())
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 8, 8, generator=g)
    condition = torch.randn(1, 5, 8, 8, generator=g)
    context = torch.randn(1, 7, TINY_SD15_UNET["cross_attention_dim"], generator=g)
    t = torch.tensor([500.0])
    run = injection._Run(condition, None, (100.0, 0.0), (0.0, 1.0), None, None)
    wrapper = injection.make_wrapper(painternet, run, 1.0, layout)

    seen = {}

    def executor(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        seen["residuals"] = args[5].get(injection.RESIDUALS)
        return args[0]

    options = {"cond_or_uncond": [0], "sigmas": torch.tensor([1.0])}
    assert wrapper(executor, x, t, context, None, None, options, **FUTURE) is x
    assert seen["kwargs"] == FUTURE, "the wrapper must forward keyword arguments it does not know"
    assert seen["residuals"] is not None and len(seen["residuals"][0][0]["up"]) == layout.n_up
    assert injection.RESIDUALS not in options, "residuals must not outlive the call"
    # Keyword-only call (how a future executor may call it) works too.
    seen.clear()
    wrapper(executor, x, t, context=context, y=None, control=None, transformer_options=options, **FUTURE)
    assert seen["kwargs"] == FUTURE

    # End to end: the patched UNet forward with an unknown keyword gives the same output as without it.
    patched = injection.apply_painternet(patcher, painternet, condition, 1.0, 0.0, 1.0)
    mm.load_models_gpu([patched] + patched.get_nested_additional_models())
    from harness.comfy_helpers import sampling_options

    with torch.no_grad():
        plain = patched.model.diffusion_model(x, t, context=context,
                                              transformer_options=sampling_options(patched, 1.0, [0]))
        future = patched.model.diffusion_model(x, t, context=context,
                                               transformer_options=sampling_options(patched, 1.0, [0]), **FUTURE)
        base = patcher.model.diffusion_model(x, t, context=context)
    # Non-trivial tensors: the prediction has a real spread and the branch moved it (so equal means equal work).
    assert plain.std() > 0.1 and (plain - base).abs().mean() > 0.05 * plain.std()
    assert torch.equal(plain, future)
