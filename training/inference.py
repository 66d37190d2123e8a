"""The diffusers-side inference shared by the trainer's validation, PainterBench and the benchmarks: loading a base
model, encoding prompts (SD1.5 and SDXL), VAE encoding, CPU-drawn noise and the reference inpaint loop.

Why one module: validation images, benchmark scores and the learning check must come from the same forward that the
parity tests tie to the ComfyUI nodes (base + scaled branch residuals, CFG over [uncond, cond]); three copies would
drift. It imports ``painternet_core`` only, never the trainer or the evaluation (the rooms test enforces it).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from painternet_core.atal import tokenize_with_token_mask
from painternet_core.branch import PainterNetBranch
from painternet_core.conditioning import prepare_condition
from painternet_core.reuse import BranchReuse, ReuseSchedule

logger = logging.getLogger("painternet.training")

__all__ = [
    "BaseModel",
    "load_base_model",
    "EncodedText",
    "encode_prompts",
    "sdxl_time_ids",
    "vae_encoder",
    "cpu_randn",
    "inpaint",
]


def sdxl_time_ids(batch: dict[str, Any], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """SDXL ``add_time_ids`` (B, 6) = original_size ‖ crops_coords_top_left ‖ target_size, the order of
    diffusers' ``StableDiffusionXLPipeline._get_add_time_ids``."""
    return torch.cat([batch["original_size"], batch["crops_coords_top_left"], batch["target_size"]], dim=1).to(dtype)


# --------------------------------------------------------------------------------------------------------- base model
@dataclass
class BaseModel:
    """The frozen parts of a Stable Diffusion pipeline the trainer needs (``*_2`` are None for SD1.5)."""

    family: str
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    text_encoder_2: Any = None
    tokenizer_2: Any = None

    def frozen_modules(self) -> list[nn.Module]:
        """Every module that must not receive gradients."""
        return [m for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2) if m is not None]

    def freeze_to(self, device: Any, dtype: torch.dtype) -> None:
        """Frozen, eval mode, on ``device`` in ``dtype``; the VAE stays fp32 where it must (SDXL's overflows in fp16
        into NaNs, bf16 loses detail), as the trainer and the evaluator both need."""
        for module in self.frozen_modules():
            module.requires_grad_(False).eval()
            module.to(device, dtype=dtype)
        if self.family == "sdxl" or getattr(self.vae.config, "force_upcast", False):
            self.vae.to(dtype=torch.float32)


def _looks_sdxl_single_file(path: Path) -> bool:
    """SDXL single-file checkpoints carry the second text encoder under ``conditioner.embedders.1``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return any(key.startswith("conditioner.embedders.1.") for key in handle.keys())


def load_base_model(path: str | Path, single_file_config: str | None = None) -> BaseModel:
    """Load a base model from a local diffusers folder or a single-file SD1.5/SDXL ``.safetensors`` checkpoint.

    Why local only: training must be reproducible offline and never pull weights silently; single files go through
    ``from_single_file(..., local_files_only=True)``, which needs the component configs in the local Hugging Face
    cache or a local diffusers folder passed as ``single_file_config``.
    """
    from diffusers import (AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from painternet_core.config import infer_family

    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"--pretrained_model_name_or_path {str(path)!r} is a {path.suffix or 'suffix-less'} file; "
                             "pass a diffusers folder or a single-file .safetensors SD1.5/SDXL checkpoint (convert "
                             "pickled .ckpt files to .safetensors first).")
        cls = StableDiffusionXLPipeline if _looks_sdxl_single_file(path) else StableDiffusionPipeline
        kwargs: dict[str, Any] = {"local_files_only": True}
        if single_file_config:
            kwargs["config"] = single_file_config
        try:
            pipe = cls.from_single_file(str(path), **kwargs)
        except (OSError, EnvironmentError, ValueError) as error:
            raise ValueError(f"could not load single-file checkpoint {str(path)!r} offline ({error}); pass "
                             "--single_file_config pointing at a local diffusers folder of the same family "
                             "(e.g. a saved stable-diffusion-v1-5 or sdxl-base pipeline).") from error
        family = infer_family(pipe.unet.config)
        return BaseModel(family=family, unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder,
                         tokenizer=pipe.tokenizer, noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
                         text_encoder_2=getattr(pipe, "text_encoder_2", None),
                         tokenizer_2=getattr(pipe, "tokenizer_2", None))
    if not (path / "unet").is_dir():
        raise ValueError(f"--pretrained_model_name_or_path {str(path)!r} is neither a .safetensors file nor a "
                         "diffusers folder with a unet/ subfolder; hub ids are not downloaded — save the pipeline "
                         "locally first.")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
    family = infer_family(unet.config)
    common = {"local_files_only": True}
    base = BaseModel(
        family=family, unet=unet,
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **common),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **common),
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **common),
        noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", **common),
    )
    if family == "sdxl":
        base.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **common)
        base.tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **common)
    return base


# ------------------------------------------------------------------------------------------------------------ text
@dataclass
class EncodedText:
    """Text conditioning of one batch.

    ``token_mask`` (B, L) marks the actual tokens S of each prompt (empty for dropped prompts); ``added_cond_kwargs``
    is None for SD1.5 and holds SDXL's pooled ``text_embeds`` and ``time_ids``.
    """

    hidden_states: torch.Tensor
    token_mask: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None


@torch.no_grad()
def encode_prompts(base: BaseModel, prompts: Sequence[str], dropped: torch.Tensor, device: torch.device,
                   dtype: torch.dtype, batch: dict[str, Any] | None = None) -> EncodedText:
    """Tokenize and encode ``prompts`` with the frozen text encoder(s), applying prompt dropout.

    Why dropout differs per family: SD1.5 is trained (and sampled with CFG) against the empty prompt, so a dropped
    prompt becomes ""; SDXL's pipelines use zeroed embeddings for the negative prompt (``force_zeros_for_empty_prompt``)
    so dropped SDXL samples get zero hidden states and zero pooled embeddings. Either way S is empty for them, which
    is what excludes them from ATAL. SDXL ``time_ids`` come from the batch's real crop (``batch`` is required there).
    """
    dropped = dropped.to("cpu").bool()
    if dropped.shape != (len(prompts),):
        raise ValueError(f"dropped must be a ({len(prompts)},) bool tensor, got shape {tuple(dropped.shape)}.")
    if base.family == "sd15":
        texts = ["" if d else p for p, d in zip(prompts, dropped.tolist())]
        ids, token_mask = tokenize_with_token_mask(base.tokenizer, texts)
        hidden = base.text_encoder(ids.to(device))[0]
        return EncodedText(hidden.to(dtype), token_mask.to(device))
    if batch is None:
        raise ValueError("SDXL text encoding needs the batch (its original_size / crops_coords_top_left / "
                         "target_size give the time_ids); pass batch=...")
    ids_1, mask_1 = tokenize_with_token_mask(base.tokenizer, list(prompts))
    ids_2, mask_2 = tokenize_with_token_mask(base.tokenizer_2, list(prompts))
    out_1 = base.text_encoder(ids_1.to(device), output_hidden_states=True)
    out_2 = base.text_encoder_2(ids_2.to(device), output_hidden_states=True)
    # SDXL conditions on the penultimate layer of both encoders, concatenated, and the projected pooled output of
    # the second (diffusers' StableDiffusionXLPipeline.encode_prompt).
    hidden = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    pooled = out_2.text_embeds
    keep = (~dropped).to(device=device, dtype=hidden.dtype)
    hidden = hidden * keep[:, None, None]
    pooled = pooled * keep[:, None]
    # Both tokenizers split the same prompt identically; AND keeps S safe if a vocabulary ever differs.
    token_mask = (mask_1 & mask_2) & ~dropped[:, None]
    time_ids = sdxl_time_ids(batch).to(device=device, dtype=dtype)
    return EncodedText(hidden.to(dtype), token_mask.to(device),
                       {"text_embeds": pooled.to(dtype), "time_ids": time_ids})


def vae_encoder(vae: Any, sample: bool = True,
                generator: torch.Generator | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ``encode`` callable of ``prepare_condition``: [0, 1] pixels → scaled latent.

    Why ``sample`` (not ``mode``) in training: it matches how the target latent z_0 is drawn (diffusers' and
    BrushNet's training scripts sample the posterior), and the SD VAE's posterior std is ~1e-3 of the latent scale,
    so the branch sees the same statistics as ComfyUI's deterministic encode; validation uses ``mode``. The pixels are
    cast to the VAE's dtype (fp32 for SDXL's VAE, which overflows in fp16).
    """
    dtype = next(vae.parameters()).dtype

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        dist = vae.encode((pixels * 2 - 1).to(dtype)).latent_dist
        latent = dist.sample(generator) if sample else dist.mode()
        return latent * vae.config.scaling_factor

    return encode


def cpu_randn(shape: Sequence[int], generator: torch.Generator, device: torch.device,
           dtype: torch.dtype) -> torch.Tensor:
    """CPU-drawn noise moved to ``device``: identical numbers on every device, so CPU tests and GPU runs agree."""
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)



# ------------------------------------------------------------------------------------------------- reference loop
@torch.no_grad()
def inpaint(
    base: BaseModel,
    branch: PainterNetBranch,
    image: torch.Tensor,
    mask: torch.Tensor,
    prompt: str,
    *,
    config: Any,
    seed: int,
    num_inference_steps: int = 20,
    guidance_scale: float = 7.5,
    scale: float = 1.0,
    weight_dtype: torch.dtype = torch.float32,
    paste_back: bool = True,
    reuse: BranchReuse | None = None,
    schedule: ReuseSchedule | None = None,
) -> torch.Tensor:
    """Reference inpainting with a small DDIM loop over ``painternet_unet_forward``; returns (B,3,H,W) in [0, 1].

    Why not a diffusers pipeline: none knows the PainterNet branch, and this loop is the same forward the nodes
    reproduce in ComfyUI (base + scaled branch residuals, CFG over [uncond, cond]). ``image`` (B,3,H,W) in [0, 1],
    ``mask`` (B,1,H,W) 1 = hole. The unmasked region is pasted back from the input, as the ComfyUI workflow does;
    ``paste_back=False`` returns the raw decode instead (to measure how well the model itself preserves it).
    ``reuse``: run the branch on some steps only and reuse its last residuals (ACP outputs too) on the others, by
    the same rule as PainterNetApply's ``branch_reuse`` (``painternet_core.reuse``; None = every step, exact);
    ``schedule``: a ``ReuseSchedule`` to use instead (callers read its counts after the run).
    """
    from diffusers import DDIMScheduler

    from painternet_core.branch import injected

    device = image.device
    bsz = image.shape[0]
    scheduler = DDIMScheduler.from_config(base.noise_scheduler.config)
    scheduler.set_timesteps(num_inference_steps, device=device)
    fake = {"original_size": torch.tensor([list(image.shape[-2:])] * bsz),
            "crops_coords_top_left": torch.zeros(bsz, 2, dtype=torch.long),
            "target_size": torch.tensor([list(image.shape[-2:])] * bsz)}
    cond = encode_prompts(base, [prompt] * bsz, torch.zeros(bsz, dtype=torch.bool), device, weight_dtype, fake)
    uncond = encode_prompts(base, [prompt] * bsz, torch.ones(bsz, dtype=torch.bool), device, weight_dtype, fake)
    hidden = torch.cat([uncond.hidden_states, cond.hidden_states])
    added = None
    if cond.added_cond_kwargs is not None:
        added = {k: torch.cat([uncond.added_cond_kwargs[k], cond.added_cond_kwargs[k]])
                 for k in cond.added_cond_kwargs}
    condition = prepare_condition(image, mask, vae_encoder(base.vae, sample=False), config).to(weight_dtype)
    condition = torch.cat([condition, condition])
    generator = torch.Generator(device="cpu").manual_seed(seed)
    h, w = condition.shape[-2:]
    latents = cpu_randn((bsz, 4, h, w), generator, device, torch.float32) * scheduler.init_noise_sigma
    if schedule is None:
        schedule = ReuseSchedule(reuse)
    elif reuse is not None:
        raise ValueError("inpaint got both reuse and schedule; pass the rule in ReuseSchedule(rule) only")
    residuals = None
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t).to(weight_dtype)
        if schedule.runs_branch(float(t), lambda: model_in) or residuals is None:
            residuals = branch(model_in, t, hidden, condition, added)
        with injected(base.unet, residuals, scale):
            pred = base.unet(model_in, t, encoder_hidden_states=hidden,
                             added_cond_kwargs=dict(added) if added else None).sample.float()
        pred_uncond, pred_cond = pred.chunk(2)
        pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
        latents = scheduler.step(pred, t, latents).prev_sample
    vae_dtype = next(base.vae.parameters()).dtype
    decoded = base.vae.decode((latents / base.vae.config.scaling_factor).to(vae_dtype)).sample.float()
    decoded = ((decoded + 1) / 2).clamp(0, 1)
    if not paste_back:
        return decoded
    hole = (F.interpolate(mask.float(), size=decoded.shape[-2:], mode="nearest") > 0.5).float()
    return decoded * hole + image.float() * (1 - hole)
