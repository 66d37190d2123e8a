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
      no amount of branch training moves a colour classifier in pixel space. The VAE must therefore
      reconstruct these images. Training one was measured to be the obstacle (64×64, batch 16, 1 CPU thread):
      ``training.trainer.presets``' VAE has GroupNorm(8) over 8 channels, i.e. a per-channel instance norm that removes the
      mean colour of flat regions (10-20 % colour accuracy of held-out *reconstructions* after 300 steps); training
      through the sampled posterior learns a gray blur; GroupNorm(1) on the posterior mean, 400 steps: 44 %; width 32
      with 3 levels (×4), 400 steps at ~0.5 s/step: 69 %. So the task's VAE (:func:`task_vae`) is *constructed*: the
      same SD topology (4 levels, ×8, 4 latent channels, 8×8 latents for 64×64 images, so the tiny SD1.5 UNet keeps
      its depth) with weights set so that it is an exact patch-mean autoencoder — latent channels 0-2 are the 8×8
      patch means of R, G, B, the decoder repeats them over the patch — and a posterior std of 3e-7, so the
      trainer's posterior samples equal the mean. Measured: the decode equals the patch means to 6e-5 and the
      reconstructions of 96 held-out images classify to the right hole colour in 100 % of cases (reconstruction MSE
      0.03 on [-1, 1], all of it the 8-pixel staircase at shape edges). ``scaling_factor`` is 1/std of the task's
      latents, as SD does, so the diffusion sees unit-variance latents. It costs no pretraining time;
    * a random base UNet can in principle be steered by the branch's control points, but the branch is a *copy* of
      the base (paper §3.2) and learns from a pretrained denoiser far faster: the paper trains on top of SD, which
      already knows "a red circle". The tiny base UNet is therefore briefly trained text-to-image on the same images
      with the local prompt as its caption (10 % empty-prompt dropout, for CFG). It can then draw a red circle, but
      not *where the hole is* — that is exactly what the branch has to add.
    Both are cached under ``.cache/learning_task/<hash of the settings>/`` as a diffusers folder that
    ``training/trainer/train.py --pretrained_model_name_or_path`` loads unchanged, so the trainer's real code path is used.

Measured (bench/learning_check.py, 2-core CPU, 1 thread; base: 400 UNet pretraining steps, seed 0; branch batch 8;
24 held-out scenes; DDIM 20 steps, CFG 5; colour accuracy / in-hole attention mass of the prompt tokens)
    ===========================  =================  =================  =================
    setting                      seed 0             seed 1             seed 2
    untrained branch (0 steps)   0.21 / 0.216       0.12 / 0.216       0.33 / 0.216
    ACP + ATAL, 300 steps        0.54 / 0.494       0.38 / 0.498       0.50 / 0.477
    ===========================  =================  =================  =================
    (lr 1e-3, β 1e-2; the four settings for seeds 0-2, run with 2 threads, which moves the third decimal, are in
    bench/results/learning_check-cpu.txt). At 150 steps, lr 2e-4, seed 0: no branch 0.21 / 0.216, branch 0.25 /
    0.219, + ACP 0.29 / 0.220, + ACP + ATAL 0.33 / 0.377. So ATAL robustly moves the prompt tokens' attention into
    the hole (+0.26-0.28 of the mass in every seed; without ATAL the mass does not move), and training raises colour
    accuracy in every seed, but by 4 to 8 of 24 scenes: a per-image accuracy moves in coarse steps. The per-pixel
    prompt-colour fraction of the hole is the steadier signal: on a lighter base (200 pretraining steps on 256
    scenes, ~50 s) 150 steps of ACP + ATAL (~45 s) raise it from 0.13/0.07/0.09 to 0.31/0.22/0.30 (seeds 0/1/2, 32
    scenes, DDIM 10 steps), which is what the fast CI test (tests/test_learning_task.py) asserts, with the attention
    mass and the accuracy. β is 1e-2 here, not the
    paper's 1e-5: L_ATAL sums squared errors over the map's pixels, and the tiny branch's largest maps have 8×8 = 64
    pixels against SD1.5's 64×64 = 4096 (×64 fewer), and the budget is ~1000× shorter than the paper's, so 1e-5
    leaves ATAL without effect here.

Everything is a pure function of the seeds: scenes of (index, seed), masks of (index, seed), pretraining batches and
noise of (settings.seed, step). Train scenes use indices [0, n); held-out scenes start at :data:`HELD_OUT_OFFSET`.

Metrics (:func:`evaluate_branch`; exact on the original images, see tests/test_learning_task.py)
    * colour accuracy: every hole pixel is assigned to the nearest palette colour (4 target colours + 3 backgrounds,
      Euclidean RGB); the predicted colour is the target colour with the most hole pixels, or none if target colours
      cover < :data:`MIN_COLOUR_FRACTION` of the hole. Correct when it is the prompt's colour;
    * prompt-colour fraction: the fraction of hole pixels nearest to the prompt's colour, averaged over samples
      (per pixel, so it moves smoothly where the per-image accuracy moves in steps of 1/samples);
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

from training.trainer.data import draw_shape

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
    "prepare_task",
    "classify_hole_colour",
    "hole_colour_fraction",
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
                draw_shape(canvas, np.zeros((size, size), np.uint8), SHAPES[int(rng.integers(len(SHAPES)))],
                            TARGET_COLOURS[other], spot, small, float(rng.uniform(0, 2 * math.pi)))
                break
    seg = np.zeros((size, size), dtype=np.uint8)
    draw_shape(canvas, seg, shape, TARGET_COLOURS[colour], centre, radius, float(rng.uniform(0, 2 * math.pi)))
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

    Measured on the 2-core CPU with one thread: the constructed VAE costs nothing (reconstruction MSE 0.030, all
    of it patch staircase); 400 UNet steps take ~105 s (loss ~0.13).
    """

    seed: int = 0
    size: int = 64
    images: int = 512
    batch_size: int = 16
    unet_steps: int = 400
    unet_lr: float = 1e-3
    prompt_dropout: float = 0.1
    version: int = 3

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


#: Width of every level of the task VAE: 3 colour channels, their negated sum, and 12 constant ±1 channels.
_VAE_WIDTH = 16
_VAE_EPS = 1e-3    # amplitude of the colour channels inside the VAE (the ±1 constants dominate every GroupNorm)
_VAE_SHIFT = 20.0  # GroupNorm bias before SiLU: silu(x + 20) = x + 20 to 6e-8, so SiLU acts as the identity


def task_vae(seed: int) -> Any:
    """An exact patch-mean autoencoder in ``AutoencoderKL``'s SD topology (4 levels, ×8 down, 4 latent channels,
    GroupNorm(1), one resnet per level, mid-block attention), built by setting its weights, not by training.

    Latent channels 0-2 are the 8×8 patch means of R, G, B in [-1, 1] (channel 3 is 0); the decoder repeats each
    latent pixel over its 8×8 patch. Why constructed: training this topology on the task's images is slow on a
    2-core CPU and still loses colour (measured: GroupNorm(8) 10-20 %; GroupNorm(1), 400 steps, 44 %; width 32, 3
    levels, 400 steps: 69 % colour accuracy of held-out reconstructions, at ~0.5-0.9 s/step), whereas these flat-colour
    images only need the patch means. How the weights make it exact: every resnet's ``conv2`` and every attention's
    output projection are zero, so those blocks are identities through their residual connections; each
    downsampler averages 2×2 pixels, each upsampler copies (nearest); ``conv_in`` writes ε·(R, G, B), -ε·(R+G+B)
    and ±1 constants, so every GroupNorm(1) sees mean exactly 0 and a variance fixed by the constants to 1e-6, and
    its affine (γ = σ/ε, β = 20) restores the colours shifted into SiLU's linear range; ``conv_out`` removes the
    shift. ``seed`` only fills the weights that the zeroed paths ignore.
    """
    from diffusers import AutoencoderKL

    width = _VAE_WIDTH
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(width,) * 4, layers_per_block=1, norm_num_groups=1, sample_size=64,
            scaling_factor=1.0,
        )
    constants = torch.tensor([1.0, -1.0] * ((width - 4) // 2))
    sigma = math.sqrt(float((constants ** 2).sum()) / width + 1e-6)  # GroupNorm's std (eps 1e-6), colours aside

    def write_colours(conv: torch.nn.Conv2d) -> None:
        # conv (3 or 4 inputs → width): ε·x_c into channel c, -ε·Σx into channel 3, ±1 constants into the rest
        conv.weight.zero_()
        conv.bias.zero_()
        centre = conv.weight.shape[-1] // 2
        for c in range(3):
            conv.weight[c, c, centre, centre] = _VAE_EPS
            conv.weight[3, c, centre, centre] = -_VAE_EPS
        conv.bias[4:] = constants

    def read_colours(norm: torch.nn.GroupNorm, conv: torch.nn.Conv2d) -> None:
        # GroupNorm + SiLU + conv → channel c of the output is x_c (the shift by 20 keeps SiLU linear)
        norm.weight.zero_()
        norm.bias.zero_()
        norm.weight[:3] = sigma / _VAE_EPS
        norm.bias[:3] = _VAE_SHIFT
        conv.weight.zero_()
        conv.bias.zero_()
        centre = conv.weight.shape[-1] // 2
        for c in range(3):
            conv.weight[c, c, centre, centre] = 1.0
            conv.bias[c] = -_VAE_SHIFT

    def identity_blocks(part: Any) -> None:
        for module in part.modules():
            if type(module).__name__ == "ResnetBlock2D":
                module.conv2.weight.zero_()
                module.conv2.bias.zero_()
            elif type(module).__name__ == "Attention":
                module.to_out[0].weight.zero_()
                module.to_out[0].bias.zero_()

    with torch.no_grad():
        for part in (vae.encoder, vae.decoder):
            identity_blocks(part)
        write_colours(vae.encoder.conv_in)
        for block in vae.encoder.down_blocks:
            for down in block.downsamplers or []:  # pad (0, 1, 0, 1) then 3×3 stride 2: taps [0:2, 0:2] = 2×2 mean
                down.conv.weight.zero_()
                down.conv.bias.zero_()
                for c in range(width):
                    down.conv.weight[c, c, :2, :2] = 0.25
        read_colours(vae.encoder.conv_norm_out, vae.encoder.conv_out)  # mean channels 0-2; log-variance set below
        vae.quant_conv.weight.zero_()
        vae.quant_conv.bias.zero_()
        for c in range(4):
            vae.quant_conv.weight[c, c, 0, 0] = 1.0
        vae.quant_conv.bias[4:] = -30.0  # posterior std 3e-7: the trainer's posterior samples equal the mean
        vae.post_quant_conv.weight.zero_()
        vae.post_quant_conv.bias.zero_()
        for c in range(4):
            vae.post_quant_conv.weight[c, c, 0, 0] = 1.0
        write_colours(vae.decoder.conv_in)
        for block in vae.decoder.up_blocks:
            for up in block.upsamplers or []:  # nearest ×2 then 3×3 conv: the centre tap copies
                up.conv.weight.zero_()
                up.conv.bias.zero_()
                for c in range(width):
                    up.conv.weight[c, c, 1, 1] = 1.0
        read_colours(vae.decoder.conv_norm_out, vae.decoder.conv_out)
    return vae.eval().requires_grad_(False)


def _set_vae_scaling(vae: Any, images: torch.Tensor) -> float:
    """Set ``scaling_factor`` to 1/std of the task's latents (as SD does), so the diffusion sees unit variance;
    returns the reconstruction MSE on [-1, 1] pixels."""
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i:i + 64]).latent_dist.mode() for i in range(0, len(images), 64)])
        recon = torch.cat([vae.decode(latents[i:i + 64]).sample for i in range(0, len(latents), 64)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return float(F.mse_loss(recon, images))


def _train_unet(base: Any, images: torch.Tensor, prompts: Sequence[str], settings: PretrainSettings) -> float:
    """Text-to-image epsilon training of the base UNet on the local prompts; returns the last loss."""
    from training.inference import encode_prompts, vae_encoder

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
    from training.inference import load_base_model
    from training.trainer.presets import save_tiny_pipeline

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
        vae_mse = _set_vae_scaling(base.vae, images)
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


def prepare_task(settings: PretrainSettings, cache_root: str | Path,
                 held_out: int) -> tuple[Path, Path, list[TaskSample]]:
    """Everything a run of the task needs before training: the cached base, the training folder of
    ``settings.images`` scenes next to it, and ``held_out`` held-out samples (base path, data folder, samples)."""
    base_path = prepare_base(settings, cache_root)
    data_dir = write_task_folder(Path(cache_root) / f"data-{settings.images}-{settings.seed}", settings.images,
                                 settings.seed)
    return base_path, data_dir, held_out_samples(held_out, settings.seed)


# ------------------------------------------------------------------------------------------------------ metrics
def _nearest_palette(image: np.ndarray) -> np.ndarray:
    """(H, W) index into the palette (target colours, then backgrounds) of every pixel's nearest colour."""
    rgb = _as_uint8(image).astype(np.float32)
    return np.argmin(((rgb[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1), axis=2)


def classify_hole_colour(image: np.ndarray, mask: np.ndarray) -> str:
    """The target colour filling the hole (see the module docstring), or "none". ``image`` (H, W, 3) uint8 or
    float in [0, 1]; ``mask`` (H, W), > 0.5 = hole."""
    hole = mask > 0.5
    if not hole.any():
        raise ValueError("classify_hole_colour got an empty hole; pass the mask the image was inpainted with.")
    counts = np.bincount(_nearest_palette(image)[hole], minlength=len(_PALETTE))[:len(TARGET_COLOURS)]
    if counts.max() < MIN_COLOUR_FRACTION * hole.sum():
        return "none"
    return _PALETTE_NAMES[int(counts.argmax())]


def hole_colour_fraction(image: np.ndarray, mask: np.ndarray, colour: str) -> float:
    """Fraction of the hole's pixels whose nearest palette colour is ``colour``: a per-pixel, hence far less
    noisy, companion of the per-image colour accuracy (what the fast learning test asserts on)."""
    hole = mask > 0.5
    if not hole.any():
        raise ValueError("hole_colour_fraction got an empty hole; pass the mask the image was inpainted with.")
    return float((_nearest_palette(image)[hole] == _PALETTE_NAMES.index(colour)).mean())


def hole_shape_correct(image: np.ndarray, mask: np.ndarray, segmentation: np.ndarray, colour: str) -> bool:
    """IoU ≥ 0.5 between the hole pixels nearest to ``colour`` and the target's segmentation (inside the hole)."""
    hole = mask > 0.5
    drawn = (_nearest_palette(image) == _PALETTE_NAMES.index(colour)) & hole
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

    from training.inference import encode_prompts, vae_encoder

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
    colour_fraction: float
    shape_accuracy: float
    preservation_mse: float
    attention_mass: float
    images: list[np.ndarray]
    branch_runs: int = 0
    steps: int = 0


def train_setting(flags: Sequence[str], *, base_path: Path, data_dir: Path, output_dir: Path, steps: int,
                  learning_rate: float, beta: float, batch_size: int, seed: int) -> Any:
    """Train one branch through ``training/trainer/train.py``'s ``main`` (the real trainer) and return it (eval mode)."""
    from training.trainer.train import main

    argv = ["--pretrained_model_name_or_path", str(base_path), "--train_data", str(data_dir),
            "--output_dir", str(output_dir), "--resolution", "64", "--max_train_steps", str(steps),
            "--train_batch_size", str(batch_size), "--learning_rate", str(learning_rate), "--beta", str(beta),
            "--seed", str(seed), "--validation_steps", "0", "--report_to", "none",
            "--checkpointing_steps", str(steps + 1), *flags]
    result = main(argv)
    return result.branch.eval()


def evaluate_branch(base: Any, branch: Any, samples: Sequence[TaskSample], *, seed: int, num_inference_steps: int = 20,
                    guidance_scale: float = 5.0, reuse: Any = None) -> EvalResult:
    """Inpaint every sample (grouped by prompt, DDIM + CFG through ``training.inference.inpaint``) and score it.
    ``reuse``: a ``painternet_core.reuse.BranchReuse`` for the sampler (None: the branch runs every step); the
    result's ``branch_runs`` / ``steps`` count the sampling steps that ran the branch, over all prompt groups."""
    from painternet_core.reuse import ReuseSchedule

    from training.inference import inpaint

    raw: dict[int, np.ndarray] = {}
    runs = steps = 0
    groups: dict[str, list[int]] = {}
    for index, sample in enumerate(samples):
        groups.setdefault(sample.prompt, []).append(index)
    for prompt, indices in groups.items():
        image = torch.stack([torch.from_numpy(samples[i].image).permute(2, 0, 1).float() / 255.0 for i in indices])
        mask = torch.stack([torch.from_numpy(samples[i].mask)[None] for i in indices])
        schedule = ReuseSchedule(reuse)
        out = inpaint(base, branch, image, mask, prompt, config=branch.config, seed=seed,
                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, paste_back=False,
                      schedule=schedule)
        runs += schedule.runs if reuse is not None else num_inference_steps
        steps += num_inference_steps
        for i, decoded in zip(indices, out):
            raw[i] = decoded.permute(1, 2, 0).numpy()
    colour_hits, fractions, shape_hits, mses, pasted = [], [], [], [], []
    for index, sample in enumerate(samples):
        hole = sample.mask[:, :, None] > 0.5
        image = np.where(hole, raw[index], sample.image.astype(np.float32) / 255.0)
        pasted.append(image)
        colour_hits.append(classify_hole_colour(image, sample.mask) == sample.colour)
        fractions.append(hole_colour_fraction(image, sample.mask, sample.colour))
        shape_hits.append(hole_shape_correct(image, sample.mask, sample.segmentation, sample.colour))
        mses.append(preservation_mse(raw[index], sample.image, sample.mask))
    mass = attention_mass(base, branch, samples, seed=seed)
    return EvalResult(float(np.mean(colour_hits)), float(np.mean(fractions)), float(np.mean(shape_hits)),
                      float(np.mean(mses)), mass, pasted, runs, steps)
