"""The reliability soak and the workflow builders it and the reliability tests share (issue 8): a server with two
checkpoints and two branches, prompts built node by node, a soak plan (seeds, masks, scales, a checkpoint swap and a
branch swap, one interrupted prompt), the run that follows the websocket and measures the server's RSS, and the
pass/fail rules. ``tests/test_reliability.py`` runs it briefly; ``bench/soak.py`` runs it long and prints the log.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import requests
import torch
from PIL import Image

from harness.models import branch_file, sd15_checkpoint, sd15_checkpoint_variant
from harness.server import (ComfyServer, add_branch_checks, branch_off, decoded_branch_problems, error_text,
                            saved_pixels, start_server)

# The reference level is taken once the first prompts have loaded everything a prompt needs (checkpoint, branch,
# sampler, CLIP, VAE) and allocator pools have reached their working size.
BASELINE_PROMPTS = 3
# Allowed RSS growth from that level to the end of the soak. Measured on a 2-core EPYC: the end level is within a
# few MiB of the reference, while one leaked copy of the checkpoint (~1 GiB in fp32 on CPU) or of the branch
# (~460 MiB) is far above this; the margin absorbs allocator fragmentation and ComfyUI's growing history.
RSS_MARGIN_BYTES = 128 * 2**20

CKPT_A, CKPT_B = "tiny-sd15.safetensors", "tiny-sd15-b.safetensors"
BRANCH_A, BRANCH_B = "tiny-sd15-branch.safetensors", "tiny-sd15-branch-b.safetensors"
BRANCH_SDXL = "tiny-sdxl-branch.safetensors"
WIDTH, HEIGHT = 64, 48
MASK_MODES = ("box", "irregular", "segmentation", "paper_mix")
LEAK_TEXT = "Potential memory leak"
# A prompt run again (same graph, same seed) after checkpoint and branch swaps must give the same picture: exactly on
# a CPU; the levels allow a GPU's non-deterministic kernels.
REPEAT_TOLERANCE = 2


# ----------------------------------------------------------------------------------------------------- server set-up

def setup_server(base: str, cpu: bool = True) -> ComfyServer:
    """A server with two SD15 checkpoints (different weights), two SD15 branches and the input files the workflows
    load (the bad-input cases add their own files)."""
    server = start_server(base, cpu=cpu)
    try:
        checkpoints, branches = server.models("checkpoints"), server.models("painternet")
        os.symlink(sd15_checkpoint(), os.path.join(checkpoints, CKPT_A))
        os.symlink(sd15_checkpoint_variant("tiny-sd15-320-b.safetensors", seed=21), os.path.join(checkpoints, CKPT_B))
        os.symlink(branch_file("sd15", "tiny-sd15-320-branch.safetensors"), os.path.join(branches, BRANCH_A))
        os.symlink(branch_file("sd15", "tiny-sd15-320-branch-b.safetensors", seed=6),
                   os.path.join(branches, BRANCH_B))
        write_inputs(server)
    except BaseException:
        server.stop()
        raise
    return server


def write_inputs(server: ComfyServer) -> None:
    rgb = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    rgb[..., 0] = np.linspace(0, 255, WIDTH, dtype=np.uint8)[None]
    rgb[..., 1] = np.linspace(255, 0, HEIGHT, dtype=np.uint8)[:, None]
    rgb[..., 2] = 90
    Image.fromarray(rgb, "RGB").save(os.path.join(server.input_dir, "soak.png"))
    from safetensors.torch import save_file

    # LoadLatent + VAEDecode turn this into an IMAGE full of NaN, as a broken upstream node would produce.
    save_file({"latent_tensor": torch.full((1, 4, HEIGHT // 8, WIDTH // 8), float("nan")),
               "latent_format_version_0": torch.tensor([])}, os.path.join(server.input_dir, "nan.latent"))


# ------------------------------------------------------------------------------------------------ workflow builders

Ref = list  # ["node id", output index]


def rect_mask(nodes: dict[str, Any], width: int, height: int, box: tuple[int, int, int, int], first: int = 30) -> Ref:
    """A (1,H,W) mask with the rectangle (x, y, w, h) set to 1, from core SolidMask + MaskComposite."""
    x, y, w, h = box
    nodes[str(first)] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": width, "height": height}}
    nodes[str(first + 1)] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": w, "height": h}}
    nodes[str(first + 2)] = {"class_type": "MaskComposite", "inputs": {
        "destination": [str(first), 0], "source": [str(first + 1), 0], "x": x, "y": y, "operation": "add"}}
    return [str(first + 2), 0]


def solid_mask(nodes: dict[str, Any], value: float, width: int, height: int, first: int = 30) -> Ref:
    nodes[str(first)] = {"class_type": "SolidMask", "inputs": {"value": value, "width": width, "height": height}}
    return [str(first), 0]


def loaded_image(nodes: dict[str, Any], size: tuple[int, int] | None = None, first: int = 20) -> Ref:
    """soak.png through LoadImage, optionally ImageScale'd to `size` (w, h)."""
    nodes[str(first)] = {"class_type": "LoadImage", "inputs": {"image": "soak.png"}}
    if size is None:
        return [str(first), 0]
    nodes[str(first + 1)] = {"class_type": "ImageScale", "inputs": {
        "image": [str(first), 0], "upscale_method": "bilinear", "width": size[0], "height": size[1],
        "crop": "disabled"}}
    return [str(first + 1), 0]


def inpaint_prompt(*, seed: int = 7, scale: float = 1.0, steps: int = 2, ckpt: str = CKPT_A, branch: str = BRANCH_A,
                   image: Callable[[dict[str, Any]], Ref] | None = None,
                   mask: Callable[[dict[str, Any]], Ref] | None = None,
                   mask_mode: str | None = None, mask_seed: int = 0, prefix: str = "reliability",
                   checks: bool = False) -> dict[str, Any]:
    """The user's inpaint workflow in API format. `image`/`mask` add their source nodes and return the output to
    use; by default soak.png and a centred rectangle. `mask_mode` routes the mask through PainterNetMaskGenerator.
    `checks` also saves what `decoded_branch_problems` compares (`add_branch_checks`)."""
    nodes: dict[str, Any] = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red apple on a table", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "5": {"class_type": "PainterNetLoader", "inputs": {"painternet_name": branch, "dtype": "auto"}},
    }
    image_ref = (image or loaded_image)(nodes)
    mask_ref = mask(nodes) if mask else rect_mask(nodes, WIDTH, HEIGHT, (16, 12, 32, 24))
    if mask_mode is not None:
        nodes["10"] = {"class_type": "PainterNetMaskGenerator",
                       "inputs": {"mask": mask_ref, "mode": mask_mode, "seed": mask_seed}}
        mask_ref = ["10", 0]
    nodes.update({
        "6": {"class_type": "PainterNetApply", "inputs": {
            "model": ["1", 0], "vae": ["1", 2], "image": image_ref, "mask": mask_ref, "painternet": ["5", 0],
            "positive": ["2", 0], "negative": ["3", 0], "scale": scale, "start_percent": 0.0, "end_percent": 1.0}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["6", 0], "seed": seed, "steps": steps, "cfg": 2.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["6", 1], "negative": ["6", 2], "latent_image": ["6", 3],
            "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}},
    })
    if checks:
        add_branch_checks(nodes, image_ref, mask_ref, ["7", 0], ["1", 2], prefix)
    return nodes



# ------------------------------------------------------------------------------------------------ outcome helpers

def outcome(entry: dict[str, Any]) -> str:
    """'success', 'interrupted', or 'error: <type>: <message>' for a finished history entry."""
    if entry["status"]["status_str"] == "success":
        return "success"
    if any(kind == "execution_interrupted" for kind, _ in entry["status"].get("messages", [])):
        return "interrupted"
    return f"error: {error_text(entry)}"


def saved_images(server: ComfyServer, entry: dict[str, Any]) -> list[np.ndarray]:
    out = []
    for item in entry["outputs"]["9"]["images"]:
        with Image.open(os.path.join(server.output_dir, item["subfolder"], item["filename"])) as im:
            out.append(np.asarray(im.convert("RGB")))
    return out


def server_rss(server: ComfyServer) -> int:
    import psutil

    return psutil.Process(server.process.pid).memory_info().rss


def gpu_memory(server: ComfyServer) -> tuple[int, int] | None:
    """(allocated, reserved) bytes of torch's CUDA allocator in the server, from ComfyUI's own /system_stats;
    None on a CPU server."""
    device = requests.get(f"{server.url}/system_stats", timeout=30).json()["devices"][0]
    if device["type"] != "cuda":
        return None
    reserved = int(device["torch_vram_total"])
    return reserved - int(device["torch_vram_free"]), reserved


def interrupted_node(entry: dict[str, Any]) -> str | None:
    """The class of the node ComfyUI was running when the prompt was interrupted (None if it was not)."""
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_interrupted":
            return data.get("node_type")
    return None


# ---------------------------------------------------------------------------------------------------------- soak

@dataclass
class SoakStep:
    index: int
    label: str
    prompt: dict[str, Any]
    interrupt: bool = False
    same_as: int | None = None  # a repeat of that step's prompt: the picture must be the same
    branch_off_of: int | None = None  # that step's prompt at scale 0: the branch must have changed its hole


@dataclass
class SoakRecord:
    index: int
    label: str
    outcome: str
    seconds: float
    rss: int
    gpu: tuple[int, int] | None = None
    images: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def soak_plan(n: int) -> list[SoakStep]:
    """`n` prompts: checkpoint A + branch A, then checkpoint B (from n/3), branch B (from n/2), one interrupted
    prompt right after the branch swap, and back to A + A for the last quarter, so the end state is the reference
    state and any model the swaps failed to free shows up as growth. Seeds, mask rectangles, mask modes and scales
    vary per prompt, deterministically. Outputs are checked against reference runs of the same server: the second
    prompt is the first one with the branch off (the branch must change the hole), and the last quarter repeats the
    first prompts exactly (after the swaps and the interrupt, the same graph must give the same picture)."""
    if n < 3 * BASELINE_PROMPTS:
        raise ValueError(f"the soak needs at least {3 * BASELINE_PROMPTS} prompts for its phases, got {n}")
    rng = np.random.default_rng(2024)
    ckpt_swap, branch_swap, back = n // 3, n // 2, n - max(n // 4, BASELINE_PROMPTS)
    steps = []
    for i in range(n):
        ckpt = CKPT_B if ckpt_swap <= i < back else CKPT_A
        branch = BRANCH_B if branch_swap <= i < back else BRANCH_A
        w, h = int(rng.integers(8, 40)), int(rng.integers(8, 32))
        x, y = int(rng.integers(0, WIDTH - w + 1)), int(rng.integers(0, HEIGHT - h + 1))
        mode = MASK_MODES[i % len(MASK_MODES)]
        scale = (1.0, 0.5, 1.5, 0.0, 0.8)[i % 5]
        interrupt = i == branch_swap + 1
        label = f"{ckpt.split('.')[0]}/{branch.split('.')[0]} seed={100 + i} mask={mode}@{w}x{h}+{x}+{y} scale={scale}"
        if i == 1:
            steps.append(SoakStep(i, f"{steps[0].label.replace('scale=1.0', 'scale=0.0')} (prompt 1, branch off)",
                                  branch_off(steps[0].prompt, suffix="-off"), branch_off_of=0))
            continue
        if i >= back and i - back < ckpt_swap:
            ref = steps[i - back]
            prompt = json.loads(json.dumps(ref.prompt))
            for node in prompt.values():
                if "filename_prefix" in node["inputs"]:
                    node["inputs"]["filename_prefix"] += f"-again-{i:03d}"
            steps.append(SoakStep(i, f"{ref.label} (prompt {ref.index + 1} again)", prompt, same_as=ref.index))
            continue
        if interrupt:
            # Long enough to still be sampling when the interrupt lands after the first step.
            big = (2 * WIDTH, 2 * HEIGHT)
            prompt = inpaint_prompt(seed=100 + i, scale=scale or 1.0, steps=40, ckpt=ckpt, branch=branch,
                                    image=lambda nodes: loaded_image(nodes, big),
                                    mask=lambda nodes: rect_mask(nodes, *big, (2 * x, 2 * y, 2 * w, 2 * h)),
                                    prefix=f"soak-{i:03d}")
            label = f"{ckpt.split('.')[0]}/{branch.split('.')[0]} {big[0]}x{big[1]} 40 steps, interrupted"
        else:
            prompt = inpaint_prompt(seed=100 + i, scale=1.0 if i == 0 else scale, ckpt=ckpt, branch=branch,
                                    mask=lambda nodes, box=(x, y, w, h): rect_mask(nodes, WIDTH, HEIGHT, box),
                                    mask_mode=mode, mask_seed=i, prefix=f"soak-{i:03d}", checks=i == 0)
        steps.append(SoakStep(i, label, prompt, interrupt))
    return steps


def run_soak(server: ComfyServer, n: int,
             report: Callable[[SoakRecord], None] | None = None, node: str = "7") -> list[SoakRecord]:
    """Queue the plan as a user queueing a batch does and follow ComfyUI's websocket while the queue drains:
    `POST /interrupt` (targeted) for the marked prompt once its KSampler (node `node`) reports its first step, the
    server's RSS sampled as each prompt finishes, seconds from the server's own event timestamps.

    Two batches: the first `BASELINE_PROMPTS`, then (once they are done and the server is idle, so the reference
    RSS is not inflated by a prompt in flight) all the rest at once. Events can arrive before the POST that queued
    their prompt returns; they wait in `pending` until the id is known, so none is lost or reordered."""
    import asyncio
    import json

    import aiohttp

    plan = soak_plan(n)
    records: list[SoakRecord] = []

    async def drive() -> None:
        step_of: dict[str, SoakStep] = {}
        pending: dict[str, list[dict[str, Any]]] = {}
        started: dict[str, int] = {}
        lock = asyncio.Lock()
        interrupted = False
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"ws://127.0.0.1:{server.port}/ws?clientId={server.client_id}") as ws:

                async def handle(event: dict[str, Any]) -> None:
                    nonlocal interrupted
                    data = event["data"]
                    prompt_id = data["prompt_id"]
                    step = step_of[prompt_id]
                    if event["type"] == "execution_start":
                        started[prompt_id] = data["timestamp"]
                    elif (event["type"] == "progress" and step.interrupt and not interrupted
                          and data.get("node") == node and data.get("value", 0) >= 1):
                        await session.post(f"{server.url}/interrupt", json={"prompt_id": prompt_id})
                        interrupted = True
                    elif event["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                        rss, gpu = server_rss(server), await asyncio.to_thread(gpu_memory, server)
                        seconds = (data["timestamp"] - started.get(prompt_id, data["timestamp"])) / 1000
                        entry = await asyncio.to_thread(server.wait, prompt_id)
                        record = SoakRecord(
                            step.index, step.label, outcome(entry), seconds, rss, gpu,
                            len(entry.get("outputs", {}).get("9", {}).get("images", [])),
                            {"interrupt": step.interrupt, "interrupted_node": interrupted_node(entry),
                             "same_as": step.same_as, "branch_off_of": step.branch_off_of})
                        if record.outcome == "success" and record.images:
                            record.extra["pixels"] = saved_pixels(server, entry, "9")
                            record.extra["entry"] = entry
                        records.append(record)
                        if report is not None:
                            report(record)
                        if step.index == BASELINE_PROMPTS - 1:
                            tasks.append(asyncio.get_running_loop().create_task(queue(plan[BASELINE_PROMPTS:])))

                async def queue(steps: list[SoakStep]) -> None:
                    try:
                        for step in steps:
                            prompt_id = await asyncio.to_thread(server.queue, step.prompt)
                            async with lock:
                                step_of[prompt_id] = step
                                for event in pending.pop(prompt_id, []):
                                    await handle(event)
                    except BaseException:
                        await ws.close()  # ends the reader below, which then re-raises this
                        raise

                tasks = [asyncio.get_running_loop().create_task(queue(plan[:BASELINE_PROMPTS]))]
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        continue
                    event = json.loads(msg.data)
                    prompt_id = (event.get("data") or {}).get("prompt_id")
                    if prompt_id is None:
                        continue
                    async with lock:
                        if prompt_id in step_of:
                            await handle(event)
                        else:
                            pending.setdefault(prompt_id, []).append(event)
                    if len(records) == len(plan):
                        return
                for task in tasks:
                    if task.done() and not task.cancelled() and task.exception() is not None:
                        raise task.exception()
                raise RuntimeError(f"the websocket closed after {len(records)} of {len(plan)} prompts")

    asyncio.run(asyncio.wait_for(drive(), timeout=120.0 * n + 300.0))
    if [r.index for r in records] != list(range(n)):
        raise RuntimeError(f"prompts finished out of queue order: {[r.index for r in records]}")
    return records


def soak_problems(server: ComfyServer, records: list[SoakRecord]) -> list[str]:
    """Everything the soak promises, as a list of broken promises (empty = pass)."""
    problems = []
    for r in records:
        wanted = "interrupted" if r.extra["interrupt"] else "success"
        if r.outcome != wanted:
            problems.append(f"prompt {r.index} ({r.label}): {r.outcome}, expected {wanted}")
        elif wanted == "interrupted" and r.extra["interrupted_node"] != "KSampler":
            problems.append(f"prompt {r.index} was interrupted in {r.extra['interrupted_node']}, not while sampling")
        elif wanted == "success" and r.images != 1:
            problems.append(f"prompt {r.index} ({r.label}) saved {r.images} images")
    pixels = {r.index: r.extra.get("pixels") for r in records}
    for r in records:
        if r.extra.get("same_as") is not None and pixels[r.index] is not None:
            want = pixels[r.extra["same_as"]]
            if want is None:
                problems.append(f"prompt {r.index} repeats prompt {r.extra['same_as']}, which saved no picture")
                continue
            diff = np.abs(pixels[r.index].astype(np.int16) - want.astype(np.int16)).max()
            if diff > REPEAT_TOLERANCE:
                problems.append(f"prompt {r.index} ({r.label}) differs from its first run by up to {diff} levels")
        if r.extra.get("branch_off_of") is not None and pixels[r.index] is not None:
            on = records[r.extra["branch_off_of"]]
            if on.extra.get("entry") is None:
                problems.append(f"prompt {on.index} saved nothing to check the branch against")
                continue
            problems += [f"prompt {on.index} vs {r.index} (branch off): {p}"
                         for p in decoded_branch_problems(server, on.extra["entry"], r.extra["entry"])]
    baseline, final = records[BASELINE_PROMPTS - 1].rss, records[-1].rss
    if final - baseline > RSS_MARGIN_BYTES:
        problems.append(f"RSS grew {(final - baseline) / 2**20:.0f} MiB (from {baseline / 2**20:.0f} MiB after "
                        f"prompt {BASELINE_PROMPTS} to {final / 2**20:.0f} MiB), over the "
                        f"{RSS_MARGIN_BYTES / 2**20:.0f} MiB margin")
    log = server.log()
    if LEAK_TEXT in log:
        line = next(line for line in log.splitlines() if LEAK_TEXT in line)
        problems.append(f"ComfyUI logged a leak: {line}")
    return problems
