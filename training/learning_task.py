"""A synthetic local-prompt inpainting task small enough to *learn* on a 2-core CPU (issue 7, DESIGN §3, §7).

The task
    64×64 images: a flat background (gray, white or black, with a gentle ramp and pixel noise), one target shape in one
    of four colours (red, green, blue, yellow) × four shapes (circle, square, triangle, star), and with probability 1/2
    a smaller distractor shape of another colour elsewhere. The local prompt names the target ("red circle", words
    the tiny tokenizer knows as single tokens); the hole is drawn from the target's segmentation by the paper's mix
    (box / irregular / segmentation, Eq. 6, ``painternet_core.masks.paper_mix_mask``). The distractor stays visible,
    so copying colours from the context is not enough: the colour in the hole must come from the prompt.

Can a frozen *random* tiny base carry the signal? No, and that decides the set-up:
    * a random VAE decoder does not invert its encoder, so whatever latent the model produces decodes to colour noise;
      no amount of branch training moves a colour classifier in pixel space. The VAE is therefore first trained to
      reconstruct these images, and its ``scaling_factor`` is set to 1/std of its latents, as SD does, so the
      diffusion sees unit-variance latents. Two measured obstacles shape how (64×64, batch 16, 1 CPU thread):
      ``training.tiny``'s VAE has GroupNorm(8) over 8 channels, i.e. a per-channel instance norm that removes the
      mean colour of flat regions — after 300 steps its reconstructions classify to the right colour on only
      ~10-20 % of held-out holes; and training through the sampled posterior (initial std 1) makes the decoder
      learn a gray blur. So the task's VAE is the same topology with GroupNorm(1) (:func:`task_vae`), trained on
      the posterior *mean* (plain MSE), with the log-variance then pinned to -30 so the trainer's posterior
      samples equal the mean. Measured: 400 steps at lr 3e-3 → reconstruction MSE 0.056 on [-1, 1] and 44 % colour
      accuracy of the *reconstructions* (yellow and red survive, blue is still lost). That is not yet enough to
      carry the signal: the VAE budget (or its width) still has to grow before the branch's learning is
      measurable — open work, see issue 7;
    * a random base UNet can in principle be steered by the branch's control points, but the branch is a *copy* of
      the base (paper §3.2) and learns from a pretrained denoiser far faster: the paper trains on top of SD, which
      already knows "a red circle". The tiny base UNet is therefore briefly trained text-to-image on the same images
      with the local prompt as its caption (10 % empty-prompt dropout, for CFG). It can then draw a red circle, but
      not *where the hole is* — that is exactly what the branch has to add.
    Both are cached under ``.cache/learning_task/<hash of the settings>/`` as a diffusers folder that
    ``training/train.py --pretrained_model_name_or_path`` loads unchanged, so the trainer's real code path is used.

Everything is a pure function of the seeds: scenes of (index, seed), masks of (index, seed), pretraining batches and
noise of (settings.seed, step). Train scenes use indices [0, n); held-out scenes start at :data:`HELD_OUT_OFFSET`.

Metrics (:func:`evaluate_branch`; exact on the original images, see tests/test_learning_task.py)
    * colour accuracy: every hole pixel is assigned to the nearest palette colour (4 target colours + 3 backgrounds,
      Euclidean RGB); the predicted colour is the target colour with the most hole pixels, or none if target colours
      cover < :data:`MIN_COLOUR_FRACTION` of the hole. Correct when it is the prompt's colour;
    * shape accuracy (secondary): IoU of the prompt-coloured hole pixels with the true segmentation ≥ 0.5;
    * preservation: MSE outside the hole of the *raw* decode (before the known region is pasted back);
    * attention mass: for the branch's cross-attention maps of the prompt's actual tokens (the ATAL maps,
      ``token_mean_attention``), Σ_{in hole} map / Σ map per layer (hole area-resized to the map), averaged over
      layers, over three noise levels and over held-out samples.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from painternet_core.masks import paper_mix_mask

from .data import _draw_shape

logger = logging.getLogger("painternet.training")

__all__ = [
    "TARGET_COLOURS",
    "BACKGROUND_COLOURS",
    "SHAPES",
    "HELD_OUT_OFFSET",
    "MIN_COLOUR_FRACTION",
    "TaskSample",
    "task_scene",
    "task_sample",
    "held_out_samples",
    "write_task_folder",
    "PretrainSettings",
    "task_vae",
    "prepare_base",
    "classify_hole_colour",
    "hole_shape_correct",
    "preservation_mse",
    "attention_mass",
    "SETTINGS",
    "EvalResult",
    "train_setting",
    "evaluate_branch",
]

TARGET_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (240, 220, 40),
}
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128), "white": (240, 240, 240), "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
#: First index of the held-out scenes (training folders use indices below it).
HELD_OUT_OFFSET = 1_000_000
#: Below this fraction of target-coloured hole pixels the hole is classified as "none" (background or mush).
MIN_COLOUR_FRACTION = 0.1
_PALETTE = np.array(list(TARGET_COLOURS.values()) + list(BACKGROUND_COLOURS.values()), dtype=np.float32)
_PALETTE_NAMES = list(TARGET_COLOURS) + list(BACKGROUND_COLOURS)


@dataclass(frozen=True)
class TaskSample:
    """One scene: ``image`` (H, W, 3) uint8, ``segmentation`` of the target (H, W) uint8 {0, 1}, the paper-mix
    ``mask`` (H, W) float32 {0, 1} (1 = hole) and its ``mask_kind``, the local ``prompt`` and its ``colour``/``shape``."""

    image: np.ndarray
    segmentation: np.ndarray
    mask: np.ndarray
    mask_kind: str
    prompt: str
    colour: str
    shape: str


def task_scene(index: int, seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray, str, str]:
    """(image, target segmentation, colour, shape) of scene ``index``; a pure function of (index, seed, size)."""
    rng = np.random.default_rng([seed, index, 7_1007])
    background = list(BACKGROUND_COLOURS)[int(rng.integers(len(BACKGROUND_COLOURS)))]
    ramp = np.linspace(-12.0, 12.0, size, dtype=np.float32)
    ramp = ramp[None, :, None] if rng.random() < 0.5 else ramp[:, None, None]
    base = np.array(BACKGROUND_COLOURS[background], dtype=np.float32)
    canvas = np.clip(base + ramp + rng.normal(0, 3, (size, size, 3)), 0, 255).astype(np.uint8)
    colours = list(TARGET_COLOURS)
    colour = colours[int(rng.integers(len(colours)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    radius = int(rng.integers(size * 3 // 16, size * 5 // 16 + 1))
    centre = (int(rng.integers(radius, size - radius)), int(rng.integers(radius, size - radius)))
    if rng.random() < 0.5:  # a distractor of another colour, not overlapping the target
        other = [c for c in colours if c != colour][int(rng.integers(len(colours) - 1))]
        small = int(rng.integers(size // 16, size // 8 + 1))
        for _ in range(20):
            spot = (int(rng.integers(small, size - small)), int(rng.integers(small, size - small)))
            if math.dist(spot, centre) > radius + small + 3:
                _draw_shape(canvas, np.zeros((size, size), np.uint8), SHAPES[int(rng.integers(len(SHAPES)))],
                            TARGET_COLOURS[other], spot, small, float(rng.uniform(0, 2 * math.pi)))
                break
    seg = np.zeros((size, size), dtype=np.uint8)
    _draw_shape(canvas, seg, shape, TARGET_COLOURS[colour], centre, radius, float(rng.uniform(0, 2 * math.pi)))
    return canvas, seg, colour, shape


def task_sample(index: int, seed: int, size: int = 64) -> TaskSample:
    """Scene ``index`` with a paper-mix hole over its target (the mask's generator is seeded by (seed, index))."""
    image, seg, colour, shape = task_scene(index, seed, size)
    mask, kind = paper_mix_mask(seg, np.random.default_rng([seed, index, 31337]))
    return TaskSample(image, seg, np.asarray(mask, dtype=np.float32), kind, f"{colour} {shape}", colour, shape)


def held_out_samples(count: int, seed: int, size: int = 64) -> list[TaskSample]:
    """``count`` held-out samples (scene indices from :data:`HELD_OUT_OFFSET`, never written to a training folder)."""
    return [task_sample(HELD_OUT_OFFSET + i, seed, size) for i in range(count)]


def write_task_folder(root: str | Path, count: int, seed: int, size: int = 64) -> Path:
    """Write scenes [0, count) in ``FolderDataset``'s layout (NAME.png, NAME_mask.png = target segmentation,
    NAME.txt = local prompt); the trainer draws the paper-mix hole from the segmentation itself. Idempotent."""
    root = Path(root)
    marker = root / ".complete"
    if marker.is_file() and marker.read_text() == f"{count} {seed} {size}":
        return root
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for index in range(count):
        image, seg, colour, shape = task_scene(index, seed, size)
        name = f"scene-{index:05d}"
        cv2.imwrite(str(root / f"{name}.png"), image[:, :, ::-1])
        cv2.imwrite(str(root / f"{name}_mask.png"), seg * 255)
        (root / f"{name}.txt").write_text(f"{colour} {shape}", encoding="utf-8")
    marker.write_text(f"{count} {seed} {size}")
    return root


# ------------------------------------------------------------------------------------------------ pretraining
@dataclass(frozen=True)
class PretrainSettings:
    """How the tiny base is prepared; every field is part of the cache key.

    Measured on the 2-core CPU with one thread: 400 VAE steps take ~55 s (reconstruction MSE 0.056, see the module
    docstring: not yet sufficient), 400 UNet steps ~150 s (loss 0.10).
    """

    seed: int = 0
    size: int = 64
    images: int = 512
    batch_size: int = 16
    vae_steps: int = 400
    vae_lr: float = 3e-3
    unet_steps: int = 400
    unet_lr: float = 1e-3
    prompt_dropout: float = 0.1
    version: int = 2

    def key(self) -> str:
        """Hash of the settings (cache folder name)."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _training_images(settings: PretrainSettings) -> tuple[torch.Tensor, list[str]]:
    images, prompts = [], []
    for index in range(settings.images):
        image, _, colour, shape = task_scene(index, settings.seed, settings.size)
        images.append(torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1.0)
        prompts.append(f"{colour} {shape}")
    return torch.stack(images), prompts


def task_vae(seed: int) -> Any:
    """``training.tiny``'s VAE topology (4 levels, ×8 down, 4 latent channels, channels 8-16-16-16) with
    GroupNorm(1) instead of GroupNorm(8): with 8 groups over 8 channels every norm is a per-channel instance norm
    that erases the mean colour of flat regions, which is the whole signal of this task."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=1, sample_size=64,
            scaling_factor=0.18215,
        )
    return vae.eval()


def _train_vae(vae: Any, images: torch.Tensor, settings: PretrainSettings) -> float:
    """Reconstruction training of the posterior mean (MSE); returns the final reconstruction MSE on [-1, 1] pixels."""
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(settings.seed)
    mse = float("nan")
    for step in range(settings.vae_steps):
        index = torch.randint(0, images.shape[0], (settings.batch_size,), generator=generator)
        batch = images[index]
        recon = vae.decode(vae.encode(batch).latent_dist.mode()).sample
        loss_rec = F.mse_loss(recon, batch)
        loss_rec.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mse = float(loss_rec.detach())
        if step % 100 == 0 or step == settings.vae_steps - 1:
            logger.info("tiny VAE step %d: reconstruction MSE %.5f", step, mse)
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # pin the posterior's log-variance to -30 (std 3e-7): a deterministic autoencoder
        channels = vae.quant_conv.out_channels // 2
        vae.quant_conv.weight[channels:] = 0.0
        vae.quant_conv.bias[channels:] = -30.0
        latents = torch.cat([vae.encode(images[i:i + 64]).latent_dist.mode() for i in range(0, len(images), 64)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return mse


def _train_unet(base: Any, images: torch.Tensor, prompts: Sequence[str], settings: PretrainSettings) -> float:
    """Text-to-image epsilon training of the base UNet on the local prompts; returns the last loss."""
    from .step import encode_prompts, vae_encoder

    unet = base.unet.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.unet_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    encode = vae_encoder(base.vae, sample=False)
    with torch.no_grad():
        latents = torch.cat([encode((images[i:i + 64] + 1) / 2) for i in range(0, len(images), 64)])
    scheduler = base.noise_scheduler
    loss_value = float("nan")
    for step in range(settings.unet_steps):
        index = torch.randint(0, images.shape[0], (settings.batch_size,), generator=generator)
        dropped = torch.rand(settings.batch_size, generator=generator) < settings.prompt_dropout
        text = encode_prompts(base, [prompts[i] for i in index.tolist()], dropped, torch.device("cpu"),
                              torch.float32)
        noise = torch.randn(latents[index].shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (settings.batch_size,),
                                  generator=generator)
        noisy = scheduler.add_noise(latents[index], noise, timesteps)
        pred = unet(noisy, timesteps, encoder_hidden_states=text.hidden_states).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
        if step % 100 == 0 or step == settings.unet_steps - 1:
            logger.info("tiny base UNet step %d: loss %.4f", step, loss_value)
    unet.eval().requires_grad_(False)
    return loss_value


def prepare_base(settings: PretrainSettings, cache_root: str | Path) -> Path:
    """The pretrained tiny SD1.5-shaped base for ``settings``, built once and cached under
    ``cache_root/<settings.key()>`` (written to a temporary folder, then renamed: a killed run leaves no half base)."""
    from .step import load_base_model
    from .tiny import save_tiny_pipeline

    target = Path(cache_root) / settings.key()
    if (target / "model_index.json").is_file():
        return target
    scratch = Path(cache_root) / f".{settings.key()}.partial"
    if scratch.exists():
        shutil.rmtree(scratch)
    save_tiny_pipeline(scratch, "sd15", seed=settings.seed)
    base = load_base_model(scratch)
    base.vae = task_vae(settings.seed + 2)
    images, prompts = _training_images(settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        vae_mse = _train_vae(base.vae, images, settings)
        unet_loss = _train_unet(base, images, prompts, settings)
    base.vae.save_pretrained(scratch / "vae", safe_serialization=True)
    base.unet.save_pretrained(scratch / "unet", safe_serialization=True)
    (scratch / "learning_task.json").write_text(json.dumps(
        {"settings": dataclasses.asdict(settings), "vae_mse": vae_mse, "unet_loss": unet_loss}, indent=1))
    if target.exists():  # another process finished first
        shutil.rmtree(scratch)
        return target
    scratch.rename(target)
    logger.info("pretrained tiny base (VAE MSE %.5f, UNet loss %.4f) cached at %s", vae_mse, unet_loss, target)
    return target


# ------------------------------------------------------------------------------------------------------ metrics
def classify_hole_colour(image: np.ndarray, mask: np.ndarray) -> str:
    """The target colour filling the hole (see the module docstring), or "none". ``image`` (H, W, 3) uint8 or
    float in [0, 1]; ``mask`` (H, W), > 0.5 = hole."""
    pixels = _as_uint8(image)[mask > 0.5].astype(np.float32)
    if pixels.size == 0:
        raise ValueError("classify_hole_colour got an empty hole; pass the mask the image was inpainted with.")
    nearest = np.argmin(((pixels[:, None, :] - _PALETTE[None]) ** 2).sum(-1), axis=1)
    counts = np.bincount(nearest, minlength=len(_PALETTE))[:len(TARGET_COLOURS)]
    if counts.max() < MIN_COLOUR_FRACTION * len(pixels):
        return "none"
    return _PALETTE_NAMES[int(counts.argmax())]


def hole_shape_correct(image: np.ndarray, mask: np.ndarray, segmentation: np.ndarray, colour: str) -> bool:
    """IoU ≥ 0.5 between the hole pixels nearest to ``colour`` and the target's segmentation (inside the hole)."""
    rgb = _as_uint8(image).astype(np.float32)
    nearest = np.argmin(((rgb[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1), axis=2)
    hole = mask > 0.5
    drawn = (nearest == _PALETTE_NAMES.index(colour)) & hole
    truth = (segmentation > 0) & hole
    union = (drawn | truth).sum()
    return bool(union and (drawn & truth).sum() / union >= 0.5)


def preservation_mse(raw: np.ndarray, original: np.ndarray, mask: np.ndarray) -> float:
    """MSE (pixels in [0, 1]) outside the hole between the raw decode and the input."""
    keep = mask <= 0.5
    diff = _as_float(raw)[keep] - _as_float(original)[keep]
    return float((diff ** 2).mean())


def _as_uint8(image: np.ndarray) -> np.ndarray:
    return image if image.dtype == np.uint8 else (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def _as_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)


@torch.no_grad()
def attention_mass(base: Any, branch: Any, samples: Sequence[TaskSample], *, seed: int,
                   timesteps: Sequence[int] = (250, 500, 750)) -> float:
    """Mean over samples, noise levels and branch cross-attention layers of Σ_{hole} map / Σ map, where map is the
    token-mean attention of the prompt's actual tokens (the ATAL map). Installs ATAL processors on ``branch`` if it
    has none (they only record while a recorder is active, so the branch's outputs are unchanged)."""
    from painternet_core.atal import ATALAttnProcessor, ATALRecorder, infer_map_size, install_atal_processors
    from painternet_core.conditioning import prepare_condition

    from .step import encode_prompts, vae_encoder

    processors = [m.processor for m in branch.modules() if isinstance(getattr(m, "processor", None),
                                                                      ATALAttnProcessor)]
    recorder = processors[0].recorder if processors else ATALRecorder()
    if not processors:
        install_atal_processors(branch, recorder)
    encode = vae_encoder(base.vae, sample=False)
    generator = torch.Generator().manual_seed(seed)
    values: list[float] = []
    for sample in samples:
        image = torch.from_numpy(sample.image).permute(2, 0, 1)[None].float() / 255.0
        mask = torch.from_numpy(sample.mask)[None, None]
        latents = encode(image)
        condition = prepare_condition(image, mask, encode, branch.config)
        text = encode_prompts(base, [sample.prompt], torch.zeros(1, dtype=torch.bool), torch.device("cpu"),
                              torch.float32)
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=generator)
            noisy = base.noise_scheduler.add_noise(latents, noise, torch.tensor([t]))
            with recorder.record(text.token_mask):
                branch(noisy, torch.tensor([t]), text.hidden_states, condition)
                maps = recorder.ordered_maps()
                for layer_map in maps:
                    h, w = infer_map_size(layer_map.shape[1], *mask.shape[-2:])
                    hole = F.interpolate(mask, size=(h, w), mode="area").reshape(1, -1)
                    values.append(float((layer_map * hole).sum() / layer_map.sum().clamp_min(1e-12)))
    return float(np.mean(values))


# ------------------------------------------------------------------------------------------- train and evaluate
#: The four settings of the learning check: trainer flags (None = no branch: the zero-initialised branch, which
#: leaves the base exactly unchanged, i.e. base text-to-image with the known region pasted back).
SETTINGS: dict[str, list[str] | None] = {
    "no branch (base + paste)": None,
    "branch (no ACP, no ATAL)": ["--no_attention_control", "--no_atal"],
    "branch + ACP": ["--no_atal"],
    "branch + ACP + ATAL": [],
}


@dataclass
class EvalResult:
    """Metrics of one branch on the held-out samples, and its pasted-back inpaintings ((H, W, 3) float in [0, 1])."""

    colour_accuracy: float
    shape_accuracy: float
    preservation_mse: float
    attention_mass: float
    images: list[np.ndarray]


def train_setting(flags: Sequence[str], *, base_path: Path, data_dir: Path, output_dir: Path, steps: int,
                  learning_rate: float, beta: float, batch_size: int, seed: int) -> Any:
    """Train one branch through ``training/train.py``'s ``main`` (the real trainer) and return it (eval mode)."""
    from .train import main

    argv = ["--pretrained_model_name_or_path", str(base_path), "--train_data", str(data_dir),
            "--output_dir", str(output_dir), "--resolution", "64", "--max_train_steps", str(steps),
            "--train_batch_size", str(batch_size), "--learning_rate", str(learning_rate), "--beta", str(beta),
            "--seed", str(seed), "--validation_steps", "0", "--report_to", "none",
            "--checkpointing_steps", str(steps + 1), *flags]
    result = main(argv)
    return result.branch.eval()


def evaluate_branch(base: Any, branch: Any, samples: Sequence[TaskSample], *, seed: int, num_inference_steps: int = 20,
                    guidance_scale: float = 5.0) -> EvalResult:
    """Inpaint every sample (grouped by prompt, DDIM + CFG through ``training.step.inpaint``) and score it."""
    from .step import inpaint

    raw: dict[int, np.ndarray] = {}
    groups: dict[str, list[int]] = {}
    for index, sample in enumerate(samples):
        groups.setdefault(sample.prompt, []).append(index)
    for prompt, indices in groups.items():
        image = torch.stack([torch.from_numpy(samples[i].image).permute(2, 0, 1).float() / 255.0 for i in indices])
        mask = torch.stack([torch.from_numpy(samples[i].mask)[None] for i in indices])
        out = inpaint(base, branch, image, mask, prompt, config=branch.config, seed=seed,
                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, paste_back=False)
        for i, decoded in zip(indices, out):
            raw[i] = decoded.permute(1, 2, 0).numpy()
    colour_hits, shape_hits, mses, pasted = [], [], [], []
    for index, sample in enumerate(samples):
        hole = sample.mask[:, :, None] > 0.5
        image = np.where(hole, raw[index], sample.image.astype(np.float32) / 255.0)
        pasted.append(image)
        colour_hits.append(classify_hole_colour(image, sample.mask) == sample.colour)
        shape_hits.append(hole_shape_correct(image, sample.mask, sample.segmentation, sample.colour))
        mses.append(preservation_mse(raw[index], sample.image, sample.mask))
    mass = attention_mass(base, branch, samples, seed=seed)
    return EvalResult(float(np.mean(colour_hits)), float(np.mean(shape_hits)), float(np.mean(mses)), mass, pasted)
