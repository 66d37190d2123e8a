#!/usr/bin/env python
"""Train a PainterNet branch (paper §3.3; DESIGN §7): L = L_diff + β·L_ATAL, only the branch trainable.

One GPU:        python training/trainer/train.py --pretrained_model_name_or_path ./sd15 --train_data ./shards \
                    --output_dir out
Many GPUs:      accelerate launch [--config_file ds_zero2.yaml] training/trainer/train.py ...   (no code change)
CPU smoke run:  python training/trainer/train.py --preset tiny-sd15 --output_dir /tmp/pn

A flat orchestration script: the loss and the optimizer step live in ``training.trainer.step``, checkpoint
atomicity in ``training.trainer.checkpoints``, data in ``training.trainer.data``, base loading, text encoding and the
validation sampler in ``training.inference`` (shared with PainterBench), the branch and ATAL in ``painternet_core``.
``main(argv)`` returns a :class:`TrainResult` so tests can run the script in-process.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

if __package__ in (None, ""):  # `python training/trainer/train.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from training.trainer.optim import OPTIMIZERS, check_optimizer

logger = logging.getLogger("painternet.training")

PRESETS = {"tiny-sd15": "sd15", "tiny-sdxl": "sdxl"}
DEFAULT_RESOLUTION = {"tiny": 64, "sd15": 512, "sdxl": 1024}


# ------------------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    """Every option, documented; names follow diffusers' training scripts where one exists."""
    p = argparse.ArgumentParser(
        description="Train a PainterNet inpainting branch (L_diff + beta * ATAL) for SD1.5 or SDXL.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None,
                   help="YAML file whose keys are flag names (e.g. learning_rate: 1e-5); flags on the command line "
                        "override it.")
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", default=None,
                   help="Local diffusers SD1.5/SDXL folder, or a single-file .safetensors checkpoint. Never "
                        "downloaded from the hub.")
    g.add_argument("--single_file_config", default=None,
                   help="Local diffusers folder of the same family giving component configs for a single-file "
                        "checkpoint (needed when they are not in the local Hugging Face cache).")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="Tiny random SD1.5/SDXL-shaped model written to OUTPUT_DIR/tiny-base plus synthetic data: "
                        "the whole script runs on CPU in seconds.")
    g.add_argument("--init_branch", default=None,
                   help="Start from the weights of a PainterNet .safetensors branch (painternet_core load_branch) "
                        "instead of copying the base UNet.")
    g.add_argument("--no_attention_control", action="store_true",
                   help="Branch without Attention Control Points (ablation; BrushNet-like layer control only).")
    g = p.add_argument_group("data")
    g.add_argument("--train_data", default=None,
                   help="Folder of BrushData/PainterData .tar shards, or a folder of NAME.png + NAME_mask.png + "
                        "NAME.txt images. Not needed with --preset.")
    g.add_argument("--resolution", type=int, default=None,
                   help="Square training resolution (multiple of 8). Default 512 SD1.5, 1024 SDXL, 64 tiny presets.")
    g.add_argument("--mask_mode", default="paper_mix", choices=["paper_mix", "segmentation", "box", "irregular"],
                   help="How the training hole is drawn from the object's segmentation (paper Eq. 6 mix default).")
    g.add_argument("--caption_fallback", default="skip", choices=["skip", "global"],
                   help="BrushData objects without a kept local caption: skip (paper §3.2: train only on local "
                        "prompts; samples with none are skipped and counted) or global (train them on the scene "
                        "caption, with ATAL off for those samples).")
    g.add_argument("--prompt_dropout", type=float, default=0.1,
                   help="Probability of dropping the prompt (SD1.5: empty prompt; SDXL: zeroed embeddings).")
    g.add_argument("--synthetic_samples", type=int, default=256, help="Size of the synthetic set used by --preset.")
    g.add_argument("--dataloader_num_workers", type=int, default=0,
                   help="DataLoader workers per process (data is sharded over ranks x workers).")
    g = p.add_argument_group("optimisation")
    g.add_argument("--output_dir", default="painternet-output", help="Checkpoints, logs, validation images, export.")
    g.add_argument("--seed", type=int, default=0,
                   help="Seed of the data order, masks, noise and timesteps (per step, so resumes are exact).")
    g.add_argument("--train_batch_size", type=int, default=4, help="Batch size per process.")
    g.add_argument("--max_train_steps", type=int, default=10000, help="Optimizer steps to train for.")
    g.add_argument("--learning_rate", type=float, default=1e-5, help="Peak learning rate.")
    g.add_argument("--lr_scheduler", default="constant",
                   choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                            "constant_with_warmup"], help="diffusers learning-rate schedule.")
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up optimizer steps.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    g.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    g.add_argument("--use_8bit_adam", action="store_true",
                   help="bitsandbytes 8-bit AdamW (pip install bitsandbytes); same as --optimizer adamw8bit_bnb.")
    g.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS,
                   help="adamw (torch, foreach), adamw_fused (torch fused kernel), adamw8bit_bnb (pip install "
                        "bitsandbytes) or adamw8bit_torchao (pip install torchao, needs diffusers >= 0.37; compiles "
                        "on the first step).")
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="Autocast precision; frozen parts are cast to it (SDXL VAE stays fp32). Default: accelerate "
                        "config / no.")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="Non-reentrant block checkpointing in the branch and the frozen UNet (less memory, ~30%% "
                        "slower).")
    g.add_argument("--beta", type=float, default=1e-5, help="ATAL weight beta (paper: 1e-5).")
    g.add_argument("--no_atal", action="store_true", help="Train with L_diff only (ablation).")
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--checkpointing_steps", type=int, default=500,
                   help="Save the full training state (accelerate save_state), every rank's data position and a "
                        "ComfyUI-loadable EXPORT_NAME.safetensors every N steps into OUTPUT_DIR/checkpoint-N "
                        "(written atomically).")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="A checkpoint-N folder, or 'latest' (the newest complete and loadable checkpoint of the run "
                        "in OUTPUT_DIR; a damaged one is passed over with a warning).")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="Start a new run in an OUTPUT_DIR that holds another run's checkpoints, deleting them "
                        "(without it such a run refuses to start).")
    g.add_argument("--report_to", default="tensorboard", help="accelerate tracker (tensorboard, wandb, all, none).")
    g.add_argument("--logging_dir", default="logs", help="Tracker folder, relative to OUTPUT_DIR.")
    g.add_argument("--validation_steps", type=int, default=500,
                   help="Inpaint the validation sample every N steps (PNG + tensorboard image); 0 disables.")
    g.add_argument("--validation_image", default=None, help="Validation image (default: a held-out sample).")
    g.add_argument("--validation_mask", default=None, help="Validation mask, white = hole (with --validation_image).")
    g.add_argument("--validation_prompt", default=None, help="Validation prompt (with --validation_image).")
    g.add_argument("--validation_inference_steps", type=int, default=20, help="DDIM steps of the validation sampler.")
    g.add_argument("--validation_guidance_scale", type=float, default=7.5, help="CFG scale of the validation sampler.")
    g.add_argument("--export_name", default="painternet",
                   help="Final branch file OUTPUT_DIR/EXPORT_NAME.safetensors (PainterNet format, ComfyUI loader).")
    g.add_argument("--export_dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="dtype of the exported branch weights.")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags, layering an optional YAML config under them, and check their values."""
    from training.cli import normalize_flags

    parser = build_parser()
    argv = normalize_flags(parser, list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    if args.config:
        import yaml

        with open(args.config, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
        if not isinstance(values, dict):
            raise ValueError(f"--config {args.config!r} must hold a mapping of flag names to values, got "
                             f"{type(values).__name__}.")
        known = {a.dest for a in parser._actions}
        values = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"--config {args.config!r} has unknown keys {unknown}; use flag names such as "
                             "learning_rate or train_batch_size (see --help).")
        parser.set_defaults(**values)
        args = parser.parse_args(argv)
    if (args.preset is None) == (args.pretrained_model_name_or_path is None):
        raise ValueError("pass exactly one of --preset (tiny CPU model) and --pretrained_model_name_or_path "
                         f"(got preset={args.preset!r}, model={args.pretrained_model_name_or_path!r}).")
    if args.preset is None and args.train_data is None:
        raise ValueError("--train_data is required with --pretrained_model_name_or_path (a folder of .tar shards or "
                         "of images with _mask.png and .txt files).")
    from training.output_names import safe_stem

    if safe_stem(args.export_name) != args.export_name:
        raise ValueError(f"--export_name {args.export_name[:80]!r} must be a plain file name (letters, digits, "
                         f"'.', '_', '-'; not starting with '.'), e.g. {safe_stem(args.export_name)!r}; it names "
                         "files inside OUTPUT_DIR.")
    for name in ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "checkpointing_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.use_8bit_adam and args.optimizer not in ("adamw", "adamw8bit_bnb"):
        raise ValueError(f"--use_8bit_adam (bitsandbytes) conflicts with --optimizer {args.optimizer}; drop one.")
    check_optimizer("adamw8bit_bnb" if args.use_8bit_adam else args.optimizer)
    if not 0.0 <= args.prompt_dropout < 1.0:
        raise ValueError(f"--prompt_dropout must be in [0, 1), got {args.prompt_dropout}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(f"--checkpoints_total_limit must be >= 1 or unset, got {args.checkpoints_total_limit}.")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise ValueError(f"--resolution {args.resolution} must be a positive multiple of 8 (e.g. 512).")
    if (args.validation_image is None) != (args.validation_mask is None) or (
            args.validation_image is not None and args.validation_prompt is None):
        raise ValueError("--validation_image, --validation_mask and --validation_prompt go together; pass all three "
                         "or none (a held-out training sample is used then).")
    return args


# --------------------------------------------------------------------------------------------------------- helpers
@dataclass
class TrainResult:
    """What a run leaves behind, for tests and notebooks (the CLI ignores it)."""

    global_step: int
    losses: dict[int, dict[str, float]] = field(default_factory=dict)
    export_path: Path | None = None
    base: Any = None
    branch: Any = None
    resumed_from: Path | None = None
    #: Samples this rank's data skipped, by reason (``MalformedSample``, ``DamagedShard``...), over the whole run.
    skipped: dict[str, int] = field(default_factory=dict)


def _build_dataset(args: argparse.Namespace, resolution: int, rank: int, world_size: int, seed: int) -> Any:
    """The training set for this rank (it shards itself over rank × DataLoader worker; never accelerate-prepared)."""
    from training.trainer.data import BrushDataShards, FolderDataset, SyntheticShapes

    common = dict(rank=rank, world_size=world_size, seed=seed, mask_mode=args.mask_mode, repeat=True)
    if args.train_data is None:
        return SyntheticShapes(args.synthetic_samples, resolution, **common)
    root = Path(args.train_data)
    if not root.is_dir():
        raise ValueError(f"--train_data {str(root)!r} is not a folder; pass a folder of .tar shards or of images.")
    shards = sorted(str(p) for p in root.rglob("*.tar"))
    if shards:
        return BrushDataShards(shards, resolution, caption_fallback=args.caption_fallback, **common)
    return FolderDataset(root, resolution, **common)


def _batches(loader: Any, device: torch.device) -> Iterator[dict[str, Any]]:
    """Endless stream of batches with tensors on ``device`` (the datasets repeat over epochs)."""
    for batch in loader:
        yield {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _validation_sample(args: argparse.Namespace, resolution: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """A fixed (image [0,1], mask, prompt): the user's files, or the first sample of a differently seeded stream."""
    import numpy as np
    from PIL import Image

    if args.validation_image is not None:
        image = Image.open(args.validation_image).convert("RGB").resize((resolution, resolution), Image.BICUBIC)
        mask = Image.open(args.validation_mask).convert("L").resize((resolution, resolution), Image.NEAREST)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        hole = torch.from_numpy((np.asarray(mask) > 127).astype(np.float32))[None, None]
        return pixels, hole, str(args.validation_prompt)
    dataset = _build_dataset(args, resolution, 0, 1, args.seed + 1_000_003)
    dataset.shuffle = False
    sample = next(iter(dataset))
    return (sample["pixel_values"][None] + 1) / 2, sample["mask"][None], sample["prompt"]


def _run_validation(args: argparse.Namespace, accelerator: Any, base: Any, branch: Any, config: Any,
                    sample: tuple[torch.Tensor, torch.Tensor, str], step: int, weight_dtype: torch.dtype) -> None:
    """Every rank samples (FSDP shards need all ranks in the forward); the main process writes PNG + tensorboard."""
    import numpy as np
    from PIL import Image

    from training.inference import inpaint

    image, mask, prompt = sample
    image, mask = image.to(accelerator.device), mask.to(accelerator.device)
    result = inpaint(base, branch, image, mask, prompt, config=config, seed=args.seed,
                     num_inference_steps=args.validation_inference_steps,
                     guidance_scale=args.validation_guidance_scale, weight_dtype=weight_dtype)
    if not accelerator.is_main_process:
        return
    masked = image * (1 - mask)
    grid = torch.cat([masked, result], dim=-1)[0].permute(1, 2, 0).cpu().numpy()
    grid = (grid * 255).round().clip(0, 255).astype(np.uint8)
    out = Path(args.output_dir) / "validation"
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(out / f"step-{step:07d}.png")
    if "tensorboard" in {t.name for t in accelerator.trackers}:
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_image(f"validation/{prompt}", grid, step, dataformats="HWC")
    logger.info("validation image for step %d written to %s", step, out)


def _log_skipped(positions: dict[int, dict[str, Any]], step: int) -> dict[str, int]:
    """Skip counts of this rank's data slots (carried by the positions of the samples it consumed), logged."""
    total: dict[str, int] = {}
    for position in positions.values():
        for reason, count in (position.get("skipped") or {}).items():
            total[reason] = total.get(reason, 0) + int(count)
    if total:
        logger.info("step %d: data skipped %d samples so far (%s)", step, sum(total.values()),
                    ", ".join(f"{reason} {count}" for reason, count in sorted(total.items())))
    return total


def _optimizer(args: argparse.Namespace, params: Any) -> torch.optim.Optimizer:
    """The ``--optimizer`` (``--use_8bit_adam`` = bitsandbytes) with the AdamW flags; see ``training.trainer.optim``."""
    from training.trainer.optim import build_optimizer

    return build_optimizer("adamw8bit_bnb" if args.use_8bit_adam else args.optimizer, params,
                           lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                           weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


def _tracker_config(args: argparse.Namespace) -> dict[str, Any]:
    """Hyper-parameters in the scalar/str form tensorboard's hparams accepts."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}


# ------------------------------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> TrainResult:
    """Run a training job; see ``--help``."""
    args = parse_args(argv)
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from painternet_core.atal import ATALRecorder, install_atal_processors
    from painternet_core.branch import PainterNetBranch
    from painternet_core.checkpoint import load_branch, save_branch
    from painternet_core.config import check_comfy_supported
    from training.inference import load_base_model
    from training.trainer.checkpoints import (adopt_run, checkpoint_step, claim_output_dir, read_data_state,
                                              refuse_foreign, remove_stale, resolve_resume, save_checkpoint,
                                              write_data_state)
    from training.trainer.data import collate_samples
    from training.trainer.step import step_generator, train_step

    output_dir = Path(args.output_dir)
    # No total_limit here: accelerate only prunes folders it named itself; save_checkpoint prunes ours.
    project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir))
    accelerator = Accelerator(mixed_precision=args.mixed_precision,
                              gradient_accumulation_steps=args.gradient_accumulation_steps,
                              log_with=None if args.report_to == "none" else args.report_to,
                              project_config=project)
    logger.info("%s", accelerator.state)
    set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale(output_dir)
    # Which checkpoint (and so which run) this is decided before anything is built: a refusal costs nothing.
    resume = resolve_resume(args.resume_from_checkpoint, output_dir)
    if resume is None and not args.overwrite_output_dir:
        refuse_foreign(output_dir)
    run_id: str | None = None
    if accelerator.is_main_process:
        run_id = adopt_run(output_dir, resume) if resume is not None else \
            claim_output_dir(output_dir, args.overwrite_output_dir)
    accelerator.wait_for_everyone()

    # ---- base model (frozen) -----------------------------------------------------------------------------------
    model_path = args.pretrained_model_name_or_path
    if args.preset is not None:
        from training.trainer.presets import save_tiny_pipeline

        model_path = output_dir / "tiny-base"
        if accelerator.is_main_process and not (model_path / "model_index.json").is_file():
            save_tiny_pipeline(model_path, PRESETS[args.preset], seed=args.seed)
        accelerator.wait_for_everyone()
    base = load_base_model(model_path, args.single_file_config)
    # Before anything is copied or trained (with --init_branch too): a base the node cannot rebuild is refused here.
    check_comfy_supported(base.unet.config)
    resolution = args.resolution or DEFAULT_RESOLUTION["tiny" if args.preset else base.family]

    # ---- branch (the only trainable module) --------------------------------------------------------------------
    if args.init_branch:
        state, config = load_branch(args.init_branch)
        if config.family != base.family:
            raise ValueError(f"--init_branch {args.init_branch!r} is a {config.family} branch but the base model is "
                             f"{base.family}; use a branch trained for this family.")
        if args.no_attention_control and config.attention_control:
            raise ValueError(f"--no_attention_control conflicts with --init_branch {args.init_branch!r}, which has "
                             "ACPs; drop one of them.")
        branch = PainterNetBranch(config)
        branch.load_state_dict(state, strict=True)
    else:
        branch = PainterNetBranch.from_unet(base.unet, attention_control=not args.no_attention_control)
    config = branch.config
    branch.to(accelerator.device, dtype=torch.float32).train()
    branch.requires_grad_(True)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    base.freeze_to(accelerator.device, weight_dtype)

    recorder = None
    if not args.no_atal:
        recorder = ATALRecorder()
        install_atal_processors(branch, recorder)
    if args.gradient_checkpointing:
        branch.enable_gradient_checkpointing()
        base.unet.enable_gradient_checkpointing()  # its activations are needed for the residuals' gradients

    optimizer = _optimizer(args, [p for p in branch.parameters() if p.requires_grad])
    # A prepared scheduler steps once per process per optimizer step, so the schedule is stretched to match.
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    if accelerator.state.deepspeed_plugin is not None:  # no dataloader is prepared, so 'auto' cannot be resolved
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.train_batch_size
    branch, optimizer, lr_scheduler = accelerator.prepare(branch, optimizer, lr_scheduler)

    # ---- data (sharded per rank here, per worker inside the dataset) ----------------------------------------------
    dataset = _build_dataset(args, resolution, accelerator.process_index, accelerator.num_processes, args.seed)
    loader = DataLoader(dataset, batch_size=args.train_batch_size, collate_fn=collate_samples,
                        num_workers=args.dataloader_num_workers, pin_memory=torch.cuda.is_available(),
                        persistent_workers=args.dataloader_num_workers > 0)
    validation = _validation_sample(args, resolution) if args.validation_steps > 0 else None

    if accelerator.is_main_process and accelerator.log_with:
        accelerator.init_trackers("painternet", config=_tracker_config(args))

    # ---- resume ----------------------------------------------------------------------------------------------------
    global_step = 0
    workers = max(1, args.dataloader_num_workers)
    micro_step = 0
    replay = 0
    positions: dict[int, dict[str, Any]] = {}  # slot -> position after the last sample this rank consumed
    if resume is not None:
        accelerator.load_state(str(resume))
        global_step = checkpoint_step(resume)
        micro_step = global_step * args.gradient_accumulation_steps
        saved = read_data_state(resume, accelerator.process_index)
        if saved is not None and saved.get("workers") == workers and saved.get("micro_batches") == micro_step:
            # The next batch an uninterrupted run would see, without decoding what was consumed; noise, timesteps
            # and dropout are seeded by micro-step (step_generator), so the step itself is the same too.
            positions = {int(slot): value for slot, value in saved["positions"].items()}
            dataset.resume(positions, rotation=micro_step % workers)
        else:
            replay = micro_step
            logger.warning("%s has no data position for rank %d with %d DataLoader workers; replaying %d batches "
                           "to reach the same data (slow at large steps)", resume, accelerator.process_index,
                           workers, replay)
        logger.info("resumed from %s at step %d", resume, global_step)
    batches = _batches(loader, accelerator.device)
    for _ in range(replay):  # the stream is a pure function of the seed: replaying reaches the same next batch
        for position in next(batches)["position"]:
            positions[position["slot"]] = position

    export_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.export_dtype]

    def checkpoint_extras(folder: Path) -> None:
        """Every rank: its data position; the main process: the branch in the ComfyUI format (gathered on all)."""
        write_data_state(folder, accelerator.process_index,
                         {"micro_batches": micro_step, "workers": workers, "positions": positions})
        state = accelerator.get_state_dict(branch)
        if accelerator.is_main_process:
            save_branch(str(folder / f"{args.export_name}.safetensors"),
                        {k: v.to(export_dtype) for k, v in state.items()}, config)

    total = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("training %s branch: %d params, %d steps, %d samples/step, resolution %d, beta %s%s",
                config.family, sum(p.numel() for p in accelerator.unwrap_model(branch).parameters()),
                args.max_train_steps, total, resolution, args.beta, " (ATAL off)" if recorder is None else "")
    result = TrainResult(global_step=global_step, resumed_from=resume)
    progress = tqdm(total=args.max_train_steps, initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    sums = torch.zeros(3, device=accelerator.device)
    while global_step < args.max_train_steps:
        batch = next(batches)
        for position in batch["position"]:
            positions[position["slot"]] = position
        generator = step_generator(args.seed, micro_step, accelerator.process_index, accelerator.device)
        out = train_step(base, branch, batch, generator, optimizer, config=config, weight_dtype=weight_dtype,
                         recorder=recorder, beta=args.beta, prompt_dropout=args.prompt_dropout,
                         max_grad_norm=args.max_grad_norm, lr_scheduler=lr_scheduler, accelerator=accelerator)
        micro_step += 1
        sums += torch.stack([out.l_diff, out.l_atal, out.l_atal_weighted]).float()
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        l_diff, l_atal, l_atal_w = (accelerator.reduce(sums, "mean") / args.gradient_accumulation_steps).tolist()
        sums.zero_()
        logs = {"loss": l_diff + l_atal_w, "l_diff": l_diff, "l_atal": l_atal, "l_atal_weighted": l_atal_w,
                "lr": lr_scheduler.get_last_lr()[0]}
        if not all(math.isfinite(v) for v in logs.values()):
            raise FloatingPointError(f"non-finite loss at step {global_step}: {logs}; lower --learning_rate or use "
                                     "--mixed_precision bf16 instead of fp16.")
        result.losses[global_step] = logs
        accelerator.log(logs, step=global_step)
        progress.update(1)
        progress.set_postfix(loss=f"{logs['loss']:.4f}", atal=f"{l_atal:.3g}")
        if global_step % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit, checkpoint_extras,
                            run_id=run_id)
            _log_skipped(positions, global_step)
        if validation is not None and global_step % args.validation_steps == 0:
            _run_validation(args, accelerator, base, branch, config, validation, global_step, weight_dtype)
    progress.close()
    result.global_step = global_step
    result.skipped = _log_skipped(positions, global_step)

    # ---- export (gathered on every rank, written by the main process) ------------------------------------------
    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(branch)
    if accelerator.is_main_process:
        export = output_dir / f"{args.export_name}.safetensors"
        save_branch(str(export), {k: v.to(export_dtype) for k, v in state.items()}, config)
        result.export_path = export
        logger.info("exported %s", export)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    result.base, result.branch = base, accelerator.unwrap_model(branch)
    return result


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        main()
    except ValueError as error:
        logging.getLogger("painternet.training").error("%s", error)
        sys.exit(2)
