"""The GPU benchmark's dry run (bench/gpu_inference.py --dry-run) keeps working on CPU, and the dtype flow a CUDA GPU
takes (native fp16/bf16 compute, mixed base and branch dtypes) runs on CPU too.

The dry run is the only part of the GPU benchmark CI can run: it proves the script end to end (model building, the
pack's loader and apply, the sampler, partial loading, the diffusers reference) so the one prepared device command
does not fail on a typo. The native-dtype tests cover what the CPU path of ComfyUI never does on its own (it computes
fp16/bf16 weights in fp32): the "Float and Half" class of bugs users hit on GPUs.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from harness import torch_threads
from harness.comfy_helpers import comfy_model_config, pack_module, sampling_options
from conftest import COMFYUI_PATH, REPO
from harness.models import fill_
from painternet_core.branch import PainterNetBranch
from painternet_core.config import TINY_SD15_UNET, TINY_SDXL_UNET

FAMILIES = {"sd15": TINY_SD15_UNET, "sdxl": TINY_SDXL_UNET}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP threads waiting for each other
    made these tests ten times slower; restored after."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    log = tmp_path_factory.mktemp("gpu-bench") / "gpu_inference-dry.txt"
    env = dict(os.environ, COMFYUI_PATH=COMFYUI_PATH)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "gpu_inference.py"), "--dry-run", "--log",
                           str(log)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return log.read_text(), json.loads(log.with_suffix(".json").read_text())


def test_dry_run_log_has_every_section(dry_run):
    text, _ = dry_run
    for line in ("attention backend picked by ComfyUI: ", "== sd15: ", "== sdxl: ", "dtype parity: ",
                 "diffusers reference vs ComfyUI branch, fp32, TF32 off: ", "memory, 1-step sample",
                 "memory, 1-step sample with the models already loaded", "fp8 storage: ", "speed (fp16), s/step",
                 "checks: all passed"):
        assert line in text, line
    for family, found in (("sd15", "SD15"), ("sdxl", "SDXL")):
        block = text.split(f"== {family}: ")[1].split("\n\n")[0]
        assert f"ComfyUI's checkpoint detection: {found} (full-size layout" in block
        for row in ("fp32 ", "fp16 ", "bf16 ", "mixed ", "fp8 ", "base ", "full ", "end=0.5 ", "scale=0 ", "every_2 ",
                    "every_3 ", "adaptive "):
            assert f"\n{row}" in block or f"\n  {row}" in block, (family, row)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_dry_run_parity_is_finite_and_small(dry_run, family):
    _, results = dry_run
    assert results["failures"] == []
    got = results["families"][family]
    rows = got["dtypes"]
    assert set(rows) == {"fp32", "fp16", "bf16", "mixed", "fp8"}
    assert rows["mixed"]["base_weights"] == "fp16" and rows["mixed"]["branch_weights"] == "bf16"
    assert rows["fp32"]["branch_effect"] > 1e-2  # the random branch really changes the prediction
    for name, limit in (("fp32", 0.0), ("fp16", 3e-2), ("bf16", 1e-1), ("mixed", 1e-1)):
        parity = rows[name]["parity"]
        assert parity["finite"] and math.isfinite(parity["rel_max"]) and parity["rel_max"] <= limit, (name, parity)
        assert rows[name]["base_parity"]["finite"] and rows[name]["base_parity"]["rel_max"] <= limit
        low = rows[name]["lowvram"]
        assert low["finite"] and low["rel_max"] <= 1e-6, (name, low)
        assert len(low["loaded"]) == 2  # base and branch, both only partly loaded
        assert all(0 < m["loaded_bytes"] < m["bytes"] for m in low["loaded"]), low["loaded"]
    assert rows["fp16"]["parity"]["rel_max"] > 0  # fp16 weights really were rounded
    # fp8 storage: one byte per weight, half of fp16, and coarser than fp16 but still the same prediction's shape
    assert rows["fp8"]["branch_weights"] == "fp8_e4m3fn"
    assert rows["fp8"]["branch_weight_bytes"] * 2 == rows["fp16"]["branch_weight_bytes"]
    fp8 = rows["fp8"]["parity"]
    assert fp8["finite"] and rows["fp16"]["parity"]["rel_max"] < fp8["rel_max"] < 0.5, fp8
    # one branch call's residuals were counted: the step memory ratio has a denominator
    assert all(row["memory"]["residual_bytes"] > 0 for row in rows.values())
    ref = rows["fp32"]["reference"]
    assert ref["residuals"] == {"sd15": 12 + 1 + 15 + 16, "sdxl": 9 + 1 + 11 + 70}[family]
    assert ref["residual_rel_max"] <= 1e-4 and ref["output"]["rel_max"] <= 1e-4


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_dry_run_speed_counts_branch_calls(dry_run, family):
    _, results = dry_run
    got = results["families"][family]
    steps = 2
    calls = {name: row["branch_calls"] for name, row in got["speed"].items()}
    # every_2 and every_3 run the branch on the first of their steps only; adaptive also when the input moved more
    # than its threshold, which two steps of a random latent do
    assert calls == {"base": 0, "full": steps, "end=0.5": 1, "scale=0": 0, "every_2": 1, "every_3": 1,
                     "adaptive": steps}
    assert all(row["s_step"] > 0 for row in got["speed"].values())
    assert 1.9 < got["flops"]["full_bound"] < 2.1  # a full UNet copy doubles the FLOPs


def _native_branch(family: str, config, dtype: torch.dtype, state_dict: dict):
    """The branch as build_branch makes it on a GPU that computes `dtype` natively (no manual cast)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.ops

    branch_mod = pack_module("nodes.branch")
    module = branch_mod.ComfyPainterNetBranch(config, dtype=dtype, device="cpu",
                                              operations=comfy.ops.pick_operations(dtype, None))
    module.load_diffusers_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, "native")
    module.compute_dtype = dtype
    patcher = comfy.model_patcher.ModelPatcher(module, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    return branch_mod.PainterNet(patcher, config, f"native-{family}")


def _native_base(family: str, dtype: torch.dtype, state_dict: dict):
    import comfy.model_management as mm
    import comfy.model_patcher

    unet_config = pack_module("nodes.branch").comfy_unet_config(FAMILIES[family], in_channels=4)
    config = comfy_model_config(family, unet_config)
    config.set_inference_dtype(dtype, None)
    model = config.get_model({})
    model.diffusion_model.load_state_dict(state_dict, strict=True)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def _predict(model, condition, painternet, x, sigma, context, y):
    import comfy.model_management as mm

    patched = pack_module("nodes.injection").apply_painternet(model, painternet, condition, 1.0, 0.0, 1.0)
    mm.load_models_gpu([patched, painternet.patcher])
    s = torch.full((x.shape[0],), sigma)
    kwargs = {} if y is None else {"y": y}
    with torch.no_grad():
        denoised = patched.model.apply_model(x, s, c_crossattn=context,
                                             transformer_options=sampling_options(patched, sigma, [1, 0]), **kwargs)
    return (x - denoised) / sigma


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("base_dtype,branch_dtype", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_native_half_base_and_branch_of_other_dtype(family, base_dtype, branch_dtype):
    """What a CUDA GPU computes (weights in their own dtype, no manual cast), mixed as users mix them (an fp16
    checkpoint with a bf16 branch and the reverse): it runs, stays finite and stays close to fp32 on the same
    weights. Upsample holders, ACP and residual adds all see a hidden state of another dtype than the residual."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

    unet = FAMILIES[family]
    base = fill_(UNetModel(**pack_module("nodes.branch").comfy_unet_config(unet, in_channels=4),
                           operations=comfy.ops.disable_weight_init), 11)
    base_sd = base.state_dict()
    torch.manual_seed(0)
    from painternet_core.config import PainterNetConfig

    config = PainterNetConfig(family=family, unet=unet)
    branch_sd = fill_(PainterNetBranch(config), 12, gain=0.5).state_dict()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 16, generator=g)
    condition = torch.randn(1, 5, 16, 16, generator=g)
    context = torch.randn(2, 7, unet["cross_attention_dim"], generator=g)
    y = None
    if family == "sdxl":
        pooled = torch.randn(2, unet["projection_class_embeddings_input_dim"] - 6 * unet["addition_time_embed_dim"],
                             generator=g)
        ids = torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]] * 2)
        y = torch.cat([pooled, timestep_embedding(ids.flatten(), unet["addition_time_embed_dim"]).reshape(2, -1)], 1)
    want = _predict(_native_base(family, torch.float32, base_sd), condition,
                    _native_branch(family, config, torch.float32, branch_sd), x, 1.0, context, y)
    got = _predict(_native_base(family, base_dtype, base_sd), condition,
                   _native_branch(family, config, branch_dtype, branch_sd), x, 1.0, context, y)
    assert got.dtype == torch.float32  # ComfyUI hands the sampler fp32 whatever the compute dtype
    assert torch.isfinite(got).all()
    rel = float((got - want).abs().max() / want.abs().max())
    assert 0 < rel < 0.1, rel  # rounded (the half dtypes were really used), yet the same prediction
