"""GPU truth for the nodes: dtype parity, per-step speed, memory and low-VRAM loading, with real ComfyUI in-process.

On a CUDA machine it builds full-size random SD1.5 and SDXL UNets (ComfyUI's own `UNetModel`, the exact topology
ComfyUI detects in a checkpoint) and full-size random PainterNet branches whose control points and ACP projections get
small random weights (so the branch changes the output), all on that machine: nothing is downloaded or carried. The
base goes through the same dtype rules as ComfyUI's checkpoint loader (`unet_manual_cast` + `set_inference_dtype`),
the branch through the pack's own `build_branch` (what PainterNetLoader calls), the patch through `apply_painternet`
(what PainterNetApply calls), loading through `comfy.sampler_helpers.prepare_sampling` and sampling through
`comfy.sample.sample`. Then per family:

1. dtype parity: the patched model's noise prediction (`BaseModel.apply_model`, batch [uncond, cond]) in fp16, bf16
   and mixed (fp16 base + bf16 branch) against fp32 on the same inputs, NaN/Inf checked; in fp32 also the diffusers
   reference (painternet_core.branch) against the ComfyUI branch, residuals and patched output (TF32 off);
2. low VRAM: the same prediction after a forced partial load of base and branch (on CUDA through ComfyUI's reserved
   VRAM, what `--reserve-vram` sets; on CPU through `ModelPatcher.partially_load`, what a low-VRAM load calls) against
   the full load, within the dtype's tolerance;
3. memory: peak allocated bytes while sampling, patched minus base, over the branch's weight bytes (a 1-step sample
   from an empty device); and the extra peak of a step with both models already loaded, patched minus base, over the
   bytes of one branch call's residuals (the goal of issue 23: <= 1.1x); fp8 storage: the branch's resident bytes
   over fp16's, and its parity against fp32 (reported, not judged);
4. speed: seconds per sampling step inside the UNet forward (CUDA events), cfg > 1 so cond and uncond run, batch 1,
   for base, full range, end_percent=0.5, scale=0 and the branch_reuse choices every_2 / every_3 / adaptive, warmed
   up, interleaved, median of the repeats; the FLOP bound (base + branch FLOPs over base FLOPs, counted by torch's
   FlopCounterMode: a full UNet copy makes it ~2.00x, scaled by the steps the branch ran);
5. the attention backend ComfyUI picked.

`--dry-run` runs the same code on CPU with the tests' tiny topologies (painternet_core.config.TINY_*) in seconds; the
test suite runs it. On CPU ComfyUI computes fp16/bf16 weights in fp32 (manual cast), so the dry run checks the code
and the plumbing, not half-precision numerics; memory on CPU is peak RSS, where every weight stays resident anyway.

The log goes to bench/results/gpu_inference-<device>.txt (or --log), the figures as JSON next to it. The exit status
is 1 when a check failed (NaN/Inf, a tolerance, a partial load that was not partial).

Usage: python bench/gpu_inference.py [--dry-run] [--comfyui PATH] [--families sd15 sdxl] [--steps N] [--repeats R]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any

from machine import device_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = "ComfyUI-PainterNet"

# (name, base weight dtype, branch weight dtype); fp32 first: it is the reference of the others. "fp8" stores the
# branch in fp8_e4m3fn (PainterNetLoader's fp8 option), computed in the fp16 base's dtype through manual cast.
DTYPE_CONFIGS = (("fp32", "fp32", "fp32"), ("fp16", "fp16", "fp16"), ("bf16", "bf16", "bf16"),
                 ("mixed", "fp16", "bf16"), ("fp8", "fp16", "fp8_e4m3fn"))
# Pass criteria, chosen before measuring (not measured): max |out - ref| / max |ref| of the noise prediction against
# fp32 (or twice the unpatched base's own error, whichever is larger: see check_row), and of a partial load against
# the full load in the same dtype. fp16 keeps 11 mantissa bits, bf16 8, and the
# error grows through ~50 (SD1.5) to ~150 (SDXL) layers; the diffusers reference must match the ComfyUI branch to 1e-4.
# fp8 weights keep 3 mantissa bits: its parity is reported, not judged (no criterion was set before a measurement).
TOLERANCE = {"fp32": 1e-4, "fp16": 3e-2, "bf16": 1e-1, "mixed": 1e-1, "fp8": None}
REFERENCE_TOLERANCE = 1e-4
# Speed settings: (name, None for the bare base or (scale, start_percent, end_percent, PainterNetApply's
# branch_reuse choice)).
SPEED_SETTINGS = (("base", None), ("full", (1.0, 0.0, 1.0, "off")), ("end=0.5", (1.0, 0.0, 0.5, "off")),
                  ("scale=0", (0.0, 0.0, 1.0, "off")), ("every_2", (1.0, 0.0, 1.0, "every_2")),
                  ("every_3", (1.0, 0.0, 1.0, "every_3")), ("adaptive", (1.0, 0.0, 1.0, "adaptive")))
CONTROL_GAIN = 0.1  # control points and ACP: small random weights, so the branch acts without swamping the base


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, the tests' tiny topologies, small image: proves the code path in seconds")
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH") or os.path.join(REPO, ".cache", "comfyui"),
                        help="ComfyUI 0.3.75 folder (default $COMFYUI_PATH or .cache/comfyui)")
    parser.add_argument("--families", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    parser.add_argument("--sizes", nargs=2, type=int, metavar=("SD15", "SDXL"), default=None,
                        help="image side in px per family (default 512 1024; dry run 64 64)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps per timed run (default 8; dry run 2)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per setting, interleaved (default 5; dry run 2)")
    parser.add_argument("--cfg", type=float, default=5.0, help="CFG scale, > 1 so cond and uncond run (default 5)")
    parser.add_argument("--speed-dtype", default="fp16", choices=[c[0] for c in DTYPE_CONFIGS],
                        help="dtype configuration of the speed table (default fp16, what most users run)")
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--scheduler", default="normal")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; dry run 1, as tiny ops gain nothing from "
                             "threads and a busy machine makes OpenMP threads wait for each other)")
    parser.add_argument("--log", default=None,
                        help="log path (default <log-dir>/gpu_inference-<device>.txt); figures go to .json beside")
    parser.add_argument("--log-dir", default=os.path.join(REPO, "bench", "results"),
                        help="folder of the default log path (default bench/results)")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.dry_run else 5
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.cfg <= 1.0:
        parser.error("--cfg must be > 1 so both cond and uncond run")
    args.device = "cpu" if args.dry_run else "cuda"
    if args.sizes is None:
        args.sizes = [64, 64] if args.dry_run else [512, 1024]
    if any(s % 64 for s in args.sizes):
        parser.error("--sizes must be multiples of 64 (three 2x downsamplings of the /8 latent)")
    if args.steps is None:
        args.steps = 2 if args.dry_run else 8
    if args.threads is None and args.dry_run:
        args.threads = 1
    return args


# ---------------------------------------------------------------------------------------------------------- set-up

def setup_comfy(comfyui: str, device: str) -> Any:
    """ComfyUI first on sys.path (the repository's `nodes/` package must not shadow ComfyUI's modules), the repository
    after it for painternet_core; the device is fixed before `comfy.model_management` is imported, which picks it
    once."""
    if not os.path.isfile(os.path.join(comfyui, "comfy", "model_management.py")):
        raise SystemExit(f"no ComfyUI at {comfyui!r}: pass --comfyui or set COMFYUI_PATH (docs/gpu.md)")
    for path in (REPO, comfyui):
        if path not in sys.path:
            sys.path.insert(0, path)
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; --dry-run checks the code on CPU")
    import comfy.cli_args

    comfy.cli_args.args.cpu = device == "cpu"
    import comfy.model_management as mm

    if device == "cuda" and mm.get_torch_device().type != "cuda":
        raise SystemExit("ComfyUI picked no CUDA device; --dry-run checks the code on CPU")
    return mm


def load_pack() -> str:
    """Import the pack as ComfyUI's `nodes.load_custom_node` does: a package built from the folder's __init__.py.
    ComfyUI's nodes.py itself is not imported (it pulls in the web API and PyAV, which the bench does not need)."""
    if PACK_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_NAME, os.path.join(REPO, "__init__.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = module
        spec.loader.exec_module(module)
    return PACK_NAME


def pack_module(name: str) -> Any:
    return importlib.import_module(f"{load_pack()}.{name}")


def family_topologies(dry_run: bool) -> dict[str, dict[str, Any]]:
    """Diffusers topologies: full size, or the tests' tiny ones. The tiny SDXL keeps SDXL's 2816-wide ADM input
    (1280 pooled + 6x256 size embeddings) so ComfyUI's SDXL conditioning fits it when sampling."""
    from painternet_core.config import SD15_UNET, SDXL_UNET, TINY_SD15_UNET, TINY_SDXL_UNET

    if not dry_run:
        return {"sd15": dict(SD15_UNET), "sdxl": dict(SDXL_UNET)}
    return {"sd15": dict(TINY_SD15_UNET),
            "sdxl": dict(TINY_SDXL_UNET, addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)}


def base_unet_config(family: str, unet: dict[str, Any]) -> dict[str, Any]:
    """ComfyUI's unet_config of the base, translated by the pack's own function (the one the family check uses)."""
    return pack_module("nodes.branch").comfy_unet_config(unet, in_channels=4)


def model_config(family: str, unet_config: dict[str, Any]) -> Any:
    import comfy.supported_models as sm

    config = {"sd15": sm.SD15, "sdxl": sm.SDXL}[family](dict(unet_config))
    # The family classes force their real head layout; the tiny topologies keep their own (equal at full size).
    for key in ("num_heads", "num_head_channels"):
        config.unet_config[key] = unet_config[key]
    return config


def random_base_state_dict(family: str, unet: dict[str, Any], device: Any, seed: int) -> dict[str, Any]:
    """fp32 UNet weights in ComfyUI naming (the keys of a checkpoint's `model.diffusion_model.`), on the CPU (on the
    meta device: shapes only, unfilled)."""
    import comfy.ops
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from harness.models import fill_

    cfg = base_unet_config(family, unet)
    net = UNetModel(**cfg, dtype=torch.float32, device=device, operations=comfy.ops.disable_weight_init)
    if str(device) == "meta":
        return net.state_dict()
    fill_(net, seed)
    sd = {k: v.detach().to("cpu") for k, v in net.state_dict().items()}
    del net
    return sd


def random_branch_state_dict(family: str, unet: dict[str, Any], device: Any, seed: int) -> tuple[dict[str, Any], Any]:
    """fp32 PainterNet branch weights in the checkpoint's (diffusers) naming, plus its config: the body random at full
    gain, control points and ACP at CONTROL_GAIN."""
    import comfy.ops
    import comfy.utils
    import torch

    from harness.models import fill_
    from painternet_core.checkpoint import expected_keys
    from painternet_core.config import PainterNetConfig

    config = PainterNetConfig(family=family, unet=unet)
    branch = pack_module("nodes.branch").ComfyPainterNetBranch(config, dtype=torch.float32, device=device,
                                                               operations=comfy.ops.disable_weight_init)
    fill_(branch.diffusion_model, seed)
    controls = (branch.layer_control_down, branch.layer_control_mid, branch.layer_control_up, branch.attention_control)
    for part in controls:
        fill_(part, seed + 1, gain=CONTROL_GAIN)
    # ComfyUI's map sends both diffusers spellings of SDXL's text_time embedding (class_/add_embedding) to label_emb:
    # keep the one the checkpoint format expects.
    expected = expected_keys(config)
    to_diffusers = {"diffusion_model." + v: k for k, v in comfy.utils.unet_to_diffusers(branch.unet_config).items()
                    if k in expected}
    sd = {to_diffusers.get(k, k): v.detach().to("cpu") for k, v in branch.state_dict().items()}
    if set(sd) != expected:
        raise RuntimeError(f"random branch keys differ from the checkpoint format: {sorted(set(sd) ^ expected)[:5]}")
    del branch
    return sd, config


def detect(family: str, unet: dict[str, Any], sd: dict[str, Any]) -> str:
    """What ComfyUI's checkpoint detection makes of these weights: it must be the family's class with exactly the
    unet_config the bench builds, i.e. these are the weights of a real SD1.5/SDXL checkpoint layout."""
    import comfy.model_detection

    found = comfy.model_detection.model_config_from_unet(sd, "")
    want = model_config(family, base_unet_config(family, unet))
    if type(found) is not type(want) or found.unet_config != want.unet_config:
        raise RuntimeError(f"ComfyUI detects these {family} weights as {type(found).__name__} with another unet_config")
    return type(found).__name__


def build_base(family: str, unet: dict[str, Any], sd: dict[str, Any], dtype_name: str) -> Any:
    """A ModelPatcher with the dtype rules of ComfyUI's checkpoint loader (`load_state_dict_guess_config`)."""
    import comfy.model_management as mm
    import comfy.model_patcher

    dtype = torch_dtype(dtype_name)
    config = model_config(family, base_unet_config(family, unet))
    load_device = mm.get_torch_device()
    manual_cast = mm.unet_manual_cast(dtype, load_device, config.supported_inference_dtypes)
    config.set_inference_dtype(dtype, manual_cast)
    model = config.get_model({})
    model.diffusion_model.load_state_dict(sd, strict=True)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())


def torch_dtype(name: str) -> Any:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


# ----------------------------------------------------------------------------------------------------- the inputs

def make_inputs(family: str, unet: dict[str, Any], size: int, seed: int) -> dict[str, Any]:
    """One set of CPU inputs shared by every dtype: latent, sigma, [uncond, cond] text contexts, SDXL pooled output and
    size embeddings (as `y`, exactly as ComfyUI's SDXL.encode_adm builds it), the branch condition (scaled masked latent
    + a centred hole) and sampling conditioning for comfy.sample."""
    import torch
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

    g = torch.Generator().manual_seed(seed)
    lat = size // 8
    ctx_dim = unet["cross_attention_dim"]
    x = torch.randn(2, 4, lat, lat, generator=g)
    context = torch.randn(2, 77, ctx_dim, generator=g)
    condition = torch.randn(1, 5, lat, lat, generator=g)
    condition[:, 4] = 0.0
    condition[:, 4, lat // 4: 3 * lat // 4, lat // 4: 3 * lat // 4] = 1.0
    y, pooled = None, None
    sizes = [size, size, 0, 0, size, size]  # height, width, crop_h, crop_w, target height, target width
    if family == "sdxl":
        pooled_dim = unet["projection_class_embeddings_input_dim"] - 6 * unet["addition_time_embed_dim"]
        pooled = torch.randn(2, pooled_dim, generator=g)
        ids = torch.tensor([sizes] * 2, dtype=torch.float32)
        y = torch.cat([pooled, timestep_embedding(ids.flatten(), unet["addition_time_embed_dim"]).reshape(2, -1)], 1)

    def cond(i: int) -> list:
        extra: dict[str, Any] = {}
        if family == "sdxl":
            extra = {"pooled_output": pooled[i:i + 1], "height": size, "width": size, "crop_h": 0, "crop_w": 0,
                     "target_height": size, "target_width": size}
        return [[context[i:i + 1], extra]]

    return {"x": x, "sigma": 1.0, "context": context, "y": y, "pooled": pooled, "time_ids": sizes,
            "condition": condition, "negative": cond(0), "positive": cond(1), "latent": torch.zeros(1, 4, lat, lat)}


def transformer_options(patched: Any, sigma: Any, cond_or_uncond: list[int]) -> dict[str, Any]:
    """transformer_options as ComfyUI's sampler hands them to one model call (samplers.py `_calc_cond_batch`, with the
    wrappers the guider copies in)."""
    import comfy.patcher_extension

    options = comfy.patcher_extension.merge_nested_dicts({}, patched.model_options["transformer_options"])
    options["wrappers"] = comfy.patcher_extension.copy_nested_dicts(patched.wrappers)
    options["cond_or_uncond"] = list(cond_or_uncond)
    options["sigmas"] = sigma
    return options


def predict_noise(patched: Any, inputs: dict[str, Any]) -> Any:
    """The loaded model's noise prediction (fp32, CPU) for the [uncond, cond] batch via `BaseModel.apply_model`, the
    call the sampler makes; eps is recovered from the denoised output in fp32."""
    import torch

    model = patched.model
    device = patched.load_device
    x = inputs["x"].to(device)
    sigma = torch.full((x.shape[0],), inputs["sigma"], device=device)
    kwargs = {} if inputs["y"] is None else {"y": inputs["y"].to(device)}
    with torch.no_grad():
        denoised = model.apply_model(x, sigma, c_crossattn=inputs["context"].to(device),
                                     transformer_options=transformer_options(patched, sigma[:1], [1, 0]), **kwargs)
    return ((x - denoised) / inputs["sigma"]).float().cpu()


def load_full(patched: Any, inputs: dict[str, Any]) -> list[Any]:
    """Load base and branch as sampling does; returns the additional models to release."""
    import comfy.sampler_helpers

    _, _, models = comfy.sampler_helpers.prepare_sampling(patched, inputs["x"].shape, {}, patched.model_options)
    return models


def unload_all(mm: Any) -> None:
    """Every model off the device, and on CUDA the freed blocks back to the driver, so the next peak starts empty.
    (The collection is CUDA-only: on CPU nothing is moved and a full gc per call dominated the dry run.)"""
    import torch

    mm.unload_all_models()
    if torch.cuda.is_available():
        mm.cleanup_models_gc()
        gc.collect()
        torch.cuda.empty_cache()


def load_partial(mm: Any, patched: Any, inputs: dict[str, Any]) -> list[dict[str, Any]]:
    """Force a partial (low-VRAM) load of base and branch: the weight budget is half the smaller model, so neither
    fits. CUDA: ComfyUI's reserved VRAM (the variable `--reserve-vram` sets) is raised until only that budget is free,
    then sampling's own loader runs. CPU: `ModelPatcher.partially_load` with that budget, the call the loader makes
    on a low-VRAM device (on CPU the loader itself always loads fully). Returns each model's loaded share."""
    import comfy.sampler_helpers

    unload_all(mm)
    patchers = [patched] + patched.get_nested_additional_models()
    budget = int(0.5 * min(p.model_size() for p in patchers))
    device = patched.load_device
    if device.type == "cuda":
        # load_models_gpu leaves the first model free - R - max(inference floor, minimum) for its weights, where R is
        # the reserved VRAM and the floor is minimum_inference_memory() without R; solve for R.
        _, minimum = comfy.sampler_helpers.estimate_memory(patched, inputs["x"].shape, {})
        saved = mm.EXTRA_RESERVED_VRAM
        floor = mm.minimum_inference_memory() - saved
        mm.EXTRA_RESERVED_VRAM = max(0, int(mm.get_free_memory(device) - budget - max(floor, minimum)))
        try:
            load_full(patched, inputs)
        finally:
            mm.EXTRA_RESERVED_VRAM = saved
    else:
        for p in patchers:
            p.partially_load(p.load_device, extra_memory=budget)
    return [{"model": type(p.model).__name__, "loaded_bytes": int(p.loaded_size()), "bytes": int(p.model_size())}
            for p in patchers]


def release_partial(mm: Any, patched: Any) -> None:
    if patched.load_device.type != "cuda":
        for p in [patched] + patched.get_nested_additional_models():
            p.detach()
    unload_all(mm)


# ----------------------------------------------------------------------------------------------------------- checks

def compare(out: Any, ref: Any) -> dict[str, Any]:
    """Max |out - ref| over max |ref| (a relative error that single near-zero entries cannot blow up), the same for
    the L2 norm, and whether `out` holds NaN/Inf."""
    import torch

    finite = bool(torch.isfinite(out).all())
    diff = (out.double() - ref.double())
    scale = float(ref.double().abs().max()) or 1.0
    return {"finite": finite, "rel_max": float(diff.abs().max()) / scale if finite else float("inf"),
            "rel_l2": float(diff.norm() / (ref.double().norm() or 1.0)) if finite else float("inf")}


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off for the fp32 references: cuDNN convolutions default to TF32 on Ampere and later."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def diffusers_reference(family: str, unet: dict[str, Any], base_sd: dict[str, Any], branch_sd: dict[str, Any],
                        painternet: Any, inputs: dict[str, Any], comfy_eps: Any, base: Any) -> dict[str, Any]:
    """The trainer's diffusers branch and UNet (painternet_core.branch) on the same fp32 weights and inputs: every
    residual against the ComfyUI branch, and the patched noise prediction against `comfy_eps`."""
    import comfy.utils
    import torch
    from diffusers import UNet2DConditionModel

    from painternet_core.branch import PainterNetBranch, painternet_unet_forward

    device = base.load_device
    with torch.device(device):  # built where it runs: diffusers' own init of a full-size UNet on CPU takes minutes
        ref_unet = UNet2DConditionModel.from_config(unet).eval()
        ref_branch = PainterNetBranch(painternet.config).eval()
    to_comfy = comfy.utils.unet_to_diffusers(base_unet_config(family, unet))
    ref_unet.load_state_dict({k: base_sd[to_comfy[k]] for k in ref_unet.state_dict()}, strict=True)
    ref_branch.load_state_dict(branch_sd, strict=True)
    sigma = inputs["sigma"]
    xc = inputs["x"].to(device) / math.sqrt(sigma ** 2 + 1.0)
    # The discrete timestep ComfyUI's model_sampling gives sigma, as apply_model passes it to the UNet.
    timestep = float(base.get_model_object("model_sampling").timestep(torch.tensor([sigma])))
    t = torch.full((xc.shape[0],), timestep, device=device)
    ctx = inputs["context"].to(device)
    cond = inputs["condition"].to(device).expand(xc.shape[0], -1, -1, -1)
    added, y = None, None
    if family == "sdxl":
        added = {"text_embeds": inputs["pooled"].to(device),
                 "time_ids": torch.tensor([inputs["time_ids"]] * xc.shape[0], dtype=torch.float32, device=device)}
        y = inputs["y"].to(device)
    with torch.no_grad():
        ref = ref_branch(xc, t, ctx, cond, added)
        got = painternet.patcher.model(torch.cat([xc, cond], 1), t, ctx, y)
        ref_eps = painternet_unet_forward(ref_unet, ref_branch, xc, t, ctx, cond, 1.0, added).float().cpu()
    pairs = list(zip(ref.down + [ref.mid] + ref.up + ref.attention,
                     got["down"] + [got["mid"]] + got["up"] + list(got["attention"].values())))
    worst = max(compare(b.float().cpu(), a.float().cpu())["rel_max"] for a, b in pairs)
    out = {"residuals": len(pairs), "residual_rel_max": worst, "output": compare(comfy_eps, ref_eps)}
    del ref_unet, ref_branch
    return out


# ------------------------------------------------------------------------------------------------------ memory/speed

def peak_bytes_sampling(mm: Any, model: Any, parts: dict[str, Any], args: argparse.Namespace) -> tuple[int, int]:
    """(load, step): the peak memory of a 1-step sample from an empty device, and of a second 1-step sample with the
    models left loaded (what one step adds to the resident weights). CUDA max_memory_allocated over the allocation
    before; CPU peak RSS over the RSS before (weights stay resident in RAM either way there)."""
    import torch

    from inference_overhead import PeakRSS, sample_once

    unload_all(mm)
    peaks = []
    for _ in range(2):
        if args.device == "cuda":
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            sample_once(model, parts, args, 1)
            peaks.append(int(torch.cuda.max_memory_allocated() - start))
        else:
            with PeakRSS() as rss:
                sample_once(model, parts, args, 1)
            peaks.append(int(rss.peak - rss.start))
    return peaks[0], peaks[1]


def event_timer_class() -> type:
    from inference_overhead import UNetTimer

    class EventTimer(UNetTimer):
        """UNetTimer (time inside the base UNet forward, branch included) with CUDA events instead of synchronising
        around every call, so the host keeps queueing work as it does in a real run; events are read after the run."""

        def __init__(self, module: Any, cuda: bool) -> None:
            super().__init__(module, cuda)
            self.pairs: list[Any] = []

        def _pre(self, *_: Any) -> None:
            if not self.cuda:
                return super()._pre()
            import torch

            self.pairs.append([torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)])
            self.pairs[-1][0].record()

        def _post(self, *_: Any) -> None:
            if not self.cuda:
                return super()._post()
            self.pairs[-1][1].record()
            self.calls += 1

        def seconds(self) -> float:
            if not self.cuda:
                return self.wall
            import torch

            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self.pairs) / 1000.0

        def reset(self) -> None:
            super().reset()
            self.pairs = []

    return EventTimer


def flop_bound(patched: Any, painternet: Any, inputs: dict[str, Any]) -> dict[str, float]:
    """FLOPs of one [uncond, cond] call of the base and of the branch (torch FlopCounterMode), and the full-range
    ratio they bound: (base + branch) / base."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    device = patched.load_device
    model = patched.model
    dtype = model.manual_cast_dtype or model.get_dtype()
    x = inputs["x"].to(device, dtype)
    t = torch.full((x.shape[0],), 500.0, device=device)
    ctx = inputs["context"].to(device, dtype)
    y = None if inputs["y"] is None else inputs["y"].to(device, dtype)
    branch = painternet.patcher.model
    cond = inputs["condition"].to(device).expand(x.shape[0], -1, -1, -1)
    bdtype = branch.compute_dtype
    with torch.no_grad():
        with FlopCounterMode(display=False) as base_count:
            model.diffusion_model(x, t, context=ctx, y=y, transformer_options={})
        with FlopCounterMode(display=False) as branch_count:
            branch(torch.cat([x, cond.to(dtype)], 1).to(bdtype), t, ctx.to(bdtype), None if y is None else y.to(bdtype))
    base, extra = base_count.get_total_flops(), branch_count.get_total_flops()
    return {"base_gflop": base / 1e9, "branch_gflop": extra / 1e9, "full_bound": (base + extra) / base}


def measure_speed(mm: Any, base: Any, painternet: Any, inputs: dict[str, Any], args: argparse.Namespace) -> dict:
    """Per-step seconds of the four settings, interleaved after one untimed warm-up run of each."""
    from inference_overhead import sample_once

    apply = pack_module("nodes.injection").apply_painternet
    rule = pack_module("nodes.painternet_nodes").branch_reuse_rule
    models = {name: base if setting is None else apply(base, painternet, inputs["condition"], *setting[:3],
                                                       reuse=rule(setting[3]))
              for name, setting in SPEED_SETTINGS}
    calls = [0]
    hook = painternet.patcher.model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    timer = event_timer_class()(base.model.diffusion_model, args.device == "cuda")
    parts = {"latent": inputs["latent"], "positive": inputs["positive"], "negative": inputs["negative"]}
    unload_all(mm)
    per_step: dict[str, list[float]] = {name: [] for name, _ in SPEED_SETTINGS}
    ran: dict[str, int] = {}
    for name, _ in SPEED_SETTINGS:
        sample_once(models[name], parts, args, 2)
    for _ in range(args.repeats):
        for name, _ in SPEED_SETTINGS:
            timer.reset()
            calls[0] = 0
            sample_once(models[name], parts, args, args.steps)
            if timer.calls != args.steps:
                raise RuntimeError(f"{timer.calls} UNet calls for {args.steps} steps: cond and uncond were split")
            per_step[name].append(timer.seconds() / args.steps)
            ran[name] = calls[0]
    hook.remove()
    base_s = statistics.median(per_step["base"])
    return {name: {"s_step": statistics.median(v), "min": min(v), "max": max(v),
                   "ratio": statistics.median(v) / base_s, "branch_calls": ran[name]} for name, v in per_step.items()}


# ------------------------------------------------------------------------------------------------------------- run

class Log:
    """Prints the lines and appends them to the log file as they come, so a run cut short keeps what it measured."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        open(path, "w").close()

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def run_family(mm: Any, family: str, unet: dict[str, Any], size: int, args: argparse.Namespace, log: Log,
               failures: list[str]) -> dict[str, Any]:
    import torch

    from harness.comfy_helpers import residual_tensors

    device = mm.get_torch_device()
    t0 = time.perf_counter()
    base_sd = random_base_state_dict(family, unet, device, args.seed + 10)
    branch_sd, config = random_branch_state_dict(family, unet, device, args.seed + 20)
    build_branch = pack_module("nodes.branch").build_branch
    apply = pack_module("nodes.injection").apply_painternet
    inputs = make_inputs(family, unet, size, args.seed)
    if args.dry_run:  # the tiny topology is no checkpoint layout: check the full-size one on the meta device
        full = family_topologies(False)[family]
        detected = detect(family, full, random_base_state_dict(family, full, "meta", 0)) + " (full-size layout, meta)"
    else:
        detected = detect(family, unet, base_sd)
    base_params = sum(v.numel() for v in base_sd.values())
    branch_params = sum(v.numel() for v in branch_sd.values())
    log(f"== {family}: base UNet {base_params / 1e6:.0f} M params, branch {branch_params / 1e6:.0f} M "
        f"({len(config.layout.down)}/1/{len(config.layout.up)} layer control points, {len(config.layout.attention)} "
        f"ACP), {size}x{size} px, latent {size // 8}x{size // 8}; ComfyUI's checkpoint detection: {detected}; weights "
        f"built in {time.perf_counter() - t0:.1f} s")
    result: dict[str, Any] = {"size": size, "base_params": base_params, "branch_params": branch_params,
                              "dtypes": {}}
    eps_fp32 = base_fp32 = None
    bases: dict[str, Any] = {}
    for name, base_dtype, branch_dtype in DTYPE_CONFIGS:
        if base_dtype not in bases:
            bases.clear()
            unload_all(mm)
            bases[base_dtype] = build_base(family, unet, base_sd, base_dtype)
        base = bases[base_dtype]
        painternet = build_branch(branch_sd, config, dtype=branch_dtype, name=f"random-{family}")
        patched = apply(base, painternet, inputs["condition"], 1.0, 0.0, 1.0)
        row: dict[str, Any] = {
            "base_weights": base_dtype, "branch_weights": branch_dtype,
            "base_compute": str(base.model.manual_cast_dtype or base.model.get_dtype()).replace("torch.", ""),
            "branch_compute": str(painternet.patcher.model.compute_dtype).replace("torch.", ""),
            "branch_weight_bytes": int(painternet.patcher.model_size())}
        unload_all(mm)
        with exact_fp32():
            load_full(patched, inputs)
            eps = predict_noise(patched, inputs)
            if name == "fp32":
                eps_fp32 = eps
                try:
                    row["reference"] = diffusers_reference(family, unet, base_sd, branch_sd, painternet, inputs, eps,
                                                           base)
                except ImportError as exc:
                    row["reference"] = {"skipped": f"diffusers not importable ({exc})"}
            # The base alone in the same dtype: how far ComfyUI's own numerics move on these random weights, so a
            # patched error can be told apart from the base's.
            load_full(base, inputs)
            base_eps = predict_noise(base, inputs)
            if name == "fp32":
                base_fp32 = base_eps
                row["branch_effect"] = compare(eps, base_eps)["rel_max"]
                if row["branch_effect"] < 1e-3:
                    failures.append(f"{family}: the random branch barely changes the output "
                                    f"({row['branch_effect']:.1e})")
            row["parity"] = compare(eps, eps_fp32)
            row["base_parity"] = compare(base_eps, base_fp32)
            partial = load_partial(mm, patched, inputs)
            row["lowvram"] = {"loaded": partial, **compare(predict_noise(patched, inputs), eps)}
            release_partial(mm, patched)
        parts = {"latent": inputs["latent"], "positive": inputs["positive"], "negative": inputs["negative"]}
        peak_base, step_base = peak_bytes_sampling(mm, base, parts, args)
        residual_bytes = [0]
        hook = painternet.patcher.model.register_forward_hook(lambda _m, _i, out: residual_bytes.__setitem__(
            0, sum(t.numel() * t.element_size() for t in residual_tensors(out))))
        peak_patched, step_patched = peak_bytes_sampling(mm, patched, parts, args)
        hook.remove()
        row["memory"] = {"base_peak": peak_base, "patched_peak": peak_patched,
                         "ratio": (peak_patched - peak_base) / row["branch_weight_bytes"],
                         "base_step": step_base, "patched_step": step_patched, "residual_bytes": residual_bytes[0],
                         "step_ratio": (step_patched - step_base) / max(residual_bytes[0], 1)}
        check_row(family, name, row, failures)
        if name == args.speed_dtype:
            unload_all(mm)
            load_full(patched, inputs)
            result["flops"] = flop_bound(patched, painternet, inputs)
            result["speed"] = measure_speed(mm, base, painternet, inputs, args)
            result["speed_dtype"] = name
        result["dtypes"][name] = row
        log(f"  [{family} {name}] parity {row['parity']['rel_max']:.2e}, low-VRAM {row['lowvram']['rel_max']:.2e}, "
            f"memory ratio {row['memory']['ratio']:.2f}{', speed measured' if name == args.speed_dtype else ''}; "
            f"{time.perf_counter() - t0:.0f} s since the family started")
        del patched, painternet
        unload_all(mm)
    bases.clear()
    unload_all(mm)
    log_family(family, result, args, log)
    return result


def check_row(family: str, name: str, row: dict[str, Any], failures: list[str]) -> None:
    tol = TOLERANCE[name]
    # The pack must not make the prediction worse than ComfyUI's own rounding of the base makes it: random full-size
    # weights may amplify rounding more than trained ones, so twice the base's own error also passes.
    if not row["parity"]["finite"]:
        failures.append(f"{family} {name}: NaN/Inf in the patched output")
    elif tol is not None and name != "fp32" and row["parity"]["rel_max"] > max(tol, 2 * row["base_parity"]["rel_max"]):
        failures.append(f"{family} {name}: {row['parity']['rel_max']:.2e} from fp32, over the {tol:.0e} criterion "
                        f"and twice the base alone ({row['base_parity']['rel_max']:.2e})")
    low = row["lowvram"]
    low_tol = TOLERANCE["fp16"] if tol is None else tol
    if not low["finite"] or low["rel_max"] > low_tol:
        failures.append(f"{family} {name}: partial load differs from full load by {low['rel_max']:.2e} "
                        f"(> {low_tol:.0e})")
    for m in low["loaded"]:
        if m["loaded_bytes"] >= m["bytes"]:
            failures.append(f"{family} {name}: {m['model']} was fully loaded, the low-VRAM load was not forced")
    ref = row.get("reference")
    if ref and "skipped" not in ref:
        if ref["residual_rel_max"] > REFERENCE_TOLERANCE or ref["output"]["rel_max"] > REFERENCE_TOLERANCE:
            failures.append(f"{family}: diffusers reference differs from the ComfyUI branch (residuals "
                            f"{ref['residual_rel_max']:.2e}, output {ref['output']['rel_max']:.2e})")


def log_family(family: str, result: dict[str, Any], args: argparse.Namespace, log: Log) -> None:
    mib = 2 ** 20
    log("dtype parity: noise prediction of the patched model vs fp32 (max|d|/max|ref|, L2), batch [uncond, cond]; "
        "base only: the unpatched base vs its fp32 (ComfyUI's own error on these weights); low VRAM: forced partial "
        "load vs full load, same dtype")
    log(f"{'config':<7} {'base w/compute':<15} {'branch w/compute':<17} {'vs fp32':>9} {'L2':>9} {'finite':>6} "
        f"{'base only':>9} {'low-VRAM':>9} {'loaded base/branch':>19} {'crit':>6}")
    for name, row in result["dtypes"].items():
        low = row["lowvram"]
        loaded = "/".join(f"{m['loaded_bytes'] / max(m['bytes'], 1):.0%}" for m in low["loaded"])
        log(f"{name:<7} {row['base_weights'] + '/' + row['base_compute']:<15} "
            f"{row['branch_weights'] + '/' + row['branch_compute']:<17} {row['parity']['rel_max']:>9.2e} "
            f"{row['parity']['rel_l2']:>9.2e} {str(row['parity']['finite']):>6} "
            f"{row['base_parity']['rel_max']:>9.2e} {low['rel_max']:>9.2e} "
            f"{loaded:>19} {'report' if TOLERANCE[name] is None else format(TOLERANCE[name], '.0e'):>6}")
    fp32 = result["dtypes"]["fp32"]
    log(f"branch effect in fp32 (patched vs base): {fp32['branch_effect']:.2e}")
    ref = fp32.get("reference", {})
    if "skipped" in ref:
        log(f"diffusers reference: skipped, {ref['skipped']}")
    else:
        log(f"diffusers reference vs ComfyUI branch, fp32, TF32 off: {ref['residuals']} residuals max "
            f"{ref['residual_rel_max']:.2e}, patched output max {ref['output']['rel_max']:.2e} "
            f"(criterion {REFERENCE_TOLERANCE:.0e})")
    mem = "CUDA max_memory_allocated" if args.device == "cuda" else "peak RSS (CPU: weights resident either way)"
    log(f"memory, 1-step sample from an empty device, {mem}: (patched - base) / branch weight bytes")
    for name, row in result["dtypes"].items():
        m = row["memory"]
        log(f"  {name:<6} base {m['base_peak'] / mib:>9.1f} MiB  patched {m['patched_peak'] / mib:>9.1f} MiB  "
            f"branch weights {row['branch_weight_bytes'] / mib:>9.1f} MiB  ratio {m['ratio']:.2f}")
    log("memory, 1-step sample with the models already loaded: (patched - base) / one branch call's residual bytes "
        "(all control points + ACP, cond and uncond rows); goal <= 1.1")
    for name, row in result["dtypes"].items():
        m = row["memory"]
        log(f"  {name:<6} base {m['base_step'] / mib:>9.1f} MiB  patched {m['patched_step'] / mib:>9.1f} MiB  "
            f"residuals {m['residual_bytes'] / mib:>9.1f} MiB  ratio {m['step_ratio']:.2f}")
    rows = result["dtypes"]
    log(f"fp8 storage: branch weights fp8_e4m3fn {rows['fp8']['branch_weight_bytes'] / mib:.1f} MiB / fp16 "
        f"{rows['fp16']['branch_weight_bytes'] / mib:.1f} MiB = "
        f"{rows['fp8']['branch_weight_bytes'] / rows['fp16']['branch_weight_bytes']:.3f}; noise prediction vs fp32 "
        f"{rows['fp8']['parity']['rel_max']:.2e} (fp16 {rows['fp16']['parity']['rel_max']:.2e})")
    flops, speed = result["flops"], result["speed"]
    log(f"speed ({result['speed_dtype']}), s/step inside the UNet forward (branch included), median of {args.repeats} "
        f"interleaved runs of {args.steps} steps (min-max), cfg {args.cfg}, batch 1; FLOPs per call base "
        f"{flops['base_gflop']:.1f} G, branch {flops['branch_gflop']:.1f} G, full-range bound "
        f"{flops['full_bound']:.2f}x")
    for name, s in speed.items():
        frac = s["branch_calls"] / args.steps
        bound = 1 + (flops["full_bound"] - 1) * frac
        log(f"  {name:<8} {s['s_step']:.4f} s ({s['min']:.4f}-{s['max']:.4f})  x base {s['ratio']:.2f}  "
            f"branch ran {s['branch_calls']}/{args.steps} steps  FLOP bound {bound:.2f}x")
    log()


def device_slug(mm: Any, dry_run: bool) -> str:
    device = mm.get_torch_device()
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return "cpu-dryrun" if dry_run else "cpu"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mm = setup_comfy(args.comfyui, args.device)
    import torch

    import comfy.ldm.modules.attention as attention

    load_pack()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = mm.get_torch_device()
    path = args.log or os.path.join(args.log_dir, f"gpu_inference-{device_slug(mm, args.dry_run)}.txt")
    log = Log(path)
    name = device_name(device)
    log(f"$ python bench/gpu_inference.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    log(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S} UTC")
    log(f"device: {device} ({name}), torch {torch.__version__}, CUDA {torch.version.cuda}, python "
        f"{platform.python_version()}, {torch.get_num_threads()} CPU threads, ComfyUI at {args.comfyui}")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        log(f"GPU: {props.name}, {props.total_memory / 2 ** 30:.0f} GiB, compute capability "
            f"{props.major}.{props.minor}")
    log(f"attention backend picked by ComfyUI: {attention.optimized_attention.__name__} (xformers "
        f"{mm.xformers_enabled()}, pytorch attention {mm.pytorch_attention_enabled()}), vram state "
        f"{mm.vram_state.name}")
    log("DRY RUN on CPU with the tests' tiny topologies: checks the code path, not GPU numbers" if args.dry_run
        else "full-size random weights")
    log()
    failures: list[str] = []
    results: dict[str, Any] = {"device": name, "dry_run": args.dry_run, "torch": torch.__version__,
                               "attention": attention.optimized_attention.__name__, "families": {}}
    topologies = family_topologies(args.dry_run)
    t0 = time.perf_counter()
    json_path = os.path.splitext(path)[0] + ".json"
    for family in args.families:
        size = args.sizes[0] if family == "sd15" else args.sizes[1]
        try:
            results["families"][family] = run_family(mm, family, topologies[family], size, args, log, failures)
        except Exception:  # one family's crash (an OOM, a dtype error) must not cost the other's figures
            log(f"{family} FAILED with an exception:\n{traceback.format_exc()}")
            failures.append(f"{family}: exception, see the traceback above")
            unload_all(mm)
        results["failures"] = failures
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
    log(f"checks: {'all passed' if not failures else 'FAILED'}")
    for failure in failures:
        log(f"  FAIL {failure}")
    log(f"total wall time {time.perf_counter() - t0:.0f} s")
    print(f"log written to {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
