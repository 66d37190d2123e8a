"""GPU truth for the trainer: step time, memory, model-FLOP utilisation, ATAL cost, SDXL with an 8-bit optimizer and
smoke runs of the distributed launchers — all through the trainer's real step.

What is timed is ``training.trainer.step.train_step`` under an ``accelerate.Accelerator`` (the exact call
``training/trainer/train.py`` makes: prompt dropout, text and VAE encoding, condition prep, branch + injected base
forward, L_diff + β·L_ATAL, backward, clipping, optimizer step) on batches drawn from the trainer's synthetic dataset.
The models are random diffusers components built on the device from configs, nothing downloaded: full-size SD1.5 and
SDXL (UNet, VAE, CLIP text encoders; the tokenizers are the presets' small CLIP BPE vocabularies, which only shrinks
the frozen token-embedding tables). Sections:

1. sweep — SD1.5 at 512², bf16 mixed precision, batch 1/2/4/8 × gradient checkpointing off/on × ATAL off/on:
   median seconds per step (CUDA events; warm-up first), samples/s, peak allocated/reserved memory, bytes saved for
   backward;
2. flops — model FLOPs of one step counted with ``torch.utils.flop_counter.FlopCounterMode`` (gradient checkpointing
   off, so recomputation is not counted), per sample, checked for linearity in the batch and against the bounds set
   by the counted forwards (a frozen module's backward costs ~1× its forward for input gradients, a trained one
   ~2×, none more than 2×);
   MFU = FLOPs / (step time × dense peak). Below the goal (45 %), one step is profiled and the top kernels, the time
   share per kernel class and the device's busy fraction are logged, then the safe changes (fused AdamW,
   channels_last) are re-measured on the same configuration;
3. atal — time and peak memory with vs without ATAL (from the sweep), and one SD1.5-sized cross-attention map
   computed the explicit way (materialised softmax) vs the indicator-SDPA way: time, saved bytes, peak, max |diff|;
4. smoke — ``accelerate launch --num_processes 1`` of ``train.py`` with the FSDP config of docs/training.md and DeepSpeed ZeRO-2
   (when importable) on the tiny preset: a few steps with a checkpoint each, then a resume from the latest;
5. sdxl — SDXL at 1024², batch 1, bf16, gradient checkpointing, ATAL, AdamW vs each 8-bit AdamW installed
   (bitsandbytes, torchao): peak memory and step time; the first step's time shows torchao's compilation.

``--dry-run`` runs every section with the same code on CPU with the tiny presets (``training.trainer.presets``), at
64², so the test suite proves the harness; its numbers describe nothing. A section past ``--budget-s`` is skipped and
logged as such, so a GPU lease can be sized in advance.

Log: ``bench/results/gpu_train-<gpu>.txt`` and the same figures as JSON next to it (``.json``).

Usage: python bench/gpu_train.py [--dry-run] [--out DIR] [--steps N] [--warmup N] [--budget-s S] [--sections ...]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

# As bench.machine, not machine: tests import this file as bench.gpu_train, with bench/ not on sys.path.
from bench.machine import device_name  # noqa: E402

SECTIONS = ("sweep", "flops", "atal", "smoke", "sdxl")
#: Dense bf16 matrix rate measured on this workplace's H200 machines (8192³ random bf16 products, 769-798 TFLOP/s).
H200_BF16_TFLOPS = 790.0
MFU_GOAL = 0.45
KERNEL_CLASSES = (
    ("attention", r"flash|fmha|attention|sdpa|efficient"),
    ("optimizer", r"adam|multi_tensor|foreach|optim"),
    ("conv", r"conv|implicit_gemm|winograd|cudnn|nchw|nhwc"),
    ("matmul", r"gemm|cutlass|xmma|cublas|matmul|addmm|\bmm\b|bmm|linear"),
    ("norm", r"norm"),
    ("copy", r"memcpy|memset|copy_|to_copy|cat"),
)
#: What would move each kernel class's time (printed for the classes that take ≥ 10 % of a profiled step).
LEVERS = {
    "attention": "SDPA backend (flash/cuDNN vs memory-efficient; the ATAL map runs its own fp32 SDPA)",
    "optimizer": "fused AdamW (re-measured below) or an 8-bit AdamW",
    "conv": "channels_last (re-measured below), torch.backends.cudnn.benchmark",
    "matmul": "already GEMMs: larger batch, bf16 everywhere (the branch runs under autocast)",
    "norm": "torch.compile of the branch (fuses GroupNorm + SiLU)",
    "other": "elementwise kernels: torch.compile of the branch",
    "copy": "host-device copies: pinned batches, noise drawn on the device",
}
FSDP_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_sharding_strategy: FULL_SHARD
  fsdp_auto_wrap_policy: SIZE_BASED_WRAP
  fsdp_min_num_params: 10000000
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_use_orig_params: true
mixed_precision: bf16
num_machines: 1
num_processes: 1
"""
ZERO2_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config: {zero_stage: 2, offload_optimizer_device: none, gradient_clipping: 1.0}
mixed_precision: bf16
num_machines: 1
num_processes: 1
"""


# ------------------------------------------------------------------------------------------------------------ log
@dataclass
class Report:
    """The text log (printed as it grows) and the JSON figures, written together."""

    path: Path
    lines: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def say(self, line: str = "") -> None:
        self.lines.append(line)
        print(line, flush=True)
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(self.lines) + "\n", encoding="utf-8")
        self.path.with_suffix(".json").write_text(json.dumps(self.data, indent=1, default=str) + "\n",
                                                  encoding="utf-8")


@dataclass
class Bench:
    """Run-wide settings: device, the one Accelerator, sizes, repeat counts and the time budget."""

    device: torch.device
    accelerator: Any
    weight_dtype: torch.dtype
    dry_run: bool
    warmup: int
    steps: int
    deadline: float
    peak_tflops: float
    tmp: Path
    report: Report

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def gpu_label(device: torch.device) -> str:
    """The log's file-name tag: ``cpu-dry-run`` or the GPU's name in lowercase words (``nvidia-h200``)."""
    if device.type != "cuda":
        return "cpu-dry-run"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


# ------------------------------------------------------------------------------------------------------- models
def _clip_text(tokenizer: Any, hidden: int, layers: int, heads: int, act: str, *, projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                            hidden_act=act, projection_dim=hidden, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _full_vae(family: str) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                         sample_size=512 if family == "sd15" else 1024,
                         scaling_factor=0.18215 if family == "sd15" else 0.13025, force_upcast=family == "sdxl")


def full_size_base(family: str, device: torch.device | str, tokenizer_dir: Path) -> Any:
    """Random full-size SD1.5 or SDXL components (``training.inference.BaseModel``), constructed directly on
    ``device`` (a 2.6 B-parameter SDXL UNet initialised on the CPU would take minutes; ``"meta"`` builds none).

    SD1.5 = UNet ``SD15_UNET`` + SD VAE + CLIP ViT-L/14 text encoder; SDXL = UNet ``SDXL_UNET`` + VAE (fp32, upcast) +
    CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 with projection. The tokenizers are the presets' small CLIP BPE
    vocabularies, which only shrinks the frozen token-embedding tables.
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from painternet_core.config import SD15_UNET, SDXL_UNET
    from training.inference import BaseModel
    from training.trainer.presets import tiny_clip_tokenizer

    if family not in ("sd15", "sdxl"):
        raise ValueError(f"family must be 'sd15' or 'sdxl'; got {family!r}.")
    tokenizer = tiny_clip_tokenizer(Path(tokenizer_dir) / "tokenizer")
    tokenizer_2 = tiny_clip_tokenizer(Path(tokenizer_dir) / "tokenizer_2", pad_token="!") if family == "sdxl" else None
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
                              steps_offset=1)
    with torch.device(device):
        base = BaseModel(family=family,
                         unet=UNet2DConditionModel.from_config(SD15_UNET if family == "sd15" else SDXL_UNET),
                         vae=_full_vae(family), text_encoder=_clip_text(tokenizer, 768, 12, 12, "quick_gelu",
                                                                        projection=False),
                         tokenizer=tokenizer, noise_scheduler=scheduler, tokenizer_2=tokenizer_2)
        if tokenizer_2 is not None:
            base.text_encoder_2 = _clip_text(tokenizer_2, 1280, 32, 20, "gelu", projection=True)
    return base


def build_base(family: str, bench: Bench) -> Any:
    """The random frozen base of a section on the bench device in the mixed-precision dtype: the presets' tiny
    components in the dry run, :func:`full_size_base` otherwise."""
    from training.inference import BaseModel
    from training.trainer.presets import tiny_sd15_components, tiny_sdxl_components

    torch.manual_seed(0)
    if bench.dry_run:
        parts = (tiny_sd15_components if family == "sd15" else tiny_sdxl_components)(bench.tmp / f"tok-{family}")
        base = BaseModel(family=family, unet=parts.unet, vae=parts.vae, text_encoder=parts.text_encoder,
                         tokenizer=parts.tokenizer, noise_scheduler=parts.scheduler,
                         text_encoder_2=parts.text_encoder_2, tokenizer_2=parts.tokenizer_2)
    else:
        base = full_size_base(family, bench.device, bench.tmp / f"tok-{family}")
    base.freeze_to(bench.device, bench.weight_dtype)
    return base


def make_batches(resolution: int, batch_size: int, count: int, device: torch.device) -> list[dict[str, Any]]:
    """``count`` batches of the trainer's synthetic dataset, collated as the trainer collates them, on ``device``.

    Drawn before timing, so the step time excludes data loading (measured apart in the sweep's data line)."""
    from training.trainer.data import SyntheticShapes, collate_samples

    stream = iter(SyntheticShapes(max(count * batch_size, 1), resolution, seed=0, repeat=True))
    batches = []
    for _ in range(count):
        batch = collate_samples([next(stream) for _ in range(batch_size)])
        batches.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    return batches


def data_rate(resolution: int, seconds: float = 3.0) -> float:
    """Samples/s that one DataLoader worker's dataset code produces at ``resolution`` (to compare with the step)."""
    from training.trainer.data import SyntheticShapes

    stream = iter(SyntheticShapes(10_000, resolution, seed=1, repeat=True))
    next(stream)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(stream)
        count += 1
    return count / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------------ one step
@contextlib.contextmanager
def saved_bytes() -> Iterator[list[int]]:
    """Bytes of distinct storages autograd saves for backward inside the block (activation memory, any device)."""
    seen: set[tuple[int, int]] = set()
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        with contextlib.suppress(RuntimeError, NotImplementedError):  # tensor subclasses without a storage
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in seen:
                seen.add(key)
                total[0] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


@dataclass
class Trainee:
    """One configuration ready to step: the prepared branch and optimizer, its recorder and batches."""

    base: Any
    branch: Any
    optimizer: Any
    recorder: Any
    config: Any
    batches: list[dict[str, Any]]
    micro_step: int = 0

    def step(self, bench: Bench) -> Any:
        from training.trainer.step import step_generator, train_step

        batch = self.batches[self.micro_step % len(self.batches)]
        generator = step_generator(0, self.micro_step, 0, bench.device)
        self.micro_step += 1
        return train_step(self.base, self.branch, batch, generator, self.optimizer, config=self.config,
                          weight_dtype=bench.weight_dtype, recorder=self.recorder, beta=1e-5, prompt_dropout=0.1,
                          max_grad_norm=1.0, accelerator=bench.accelerator)


@contextlib.contextmanager
def trainee(bench: Bench, base: Any, *, batch_size: int, resolution: int, checkpointing: bool, atal: bool,
            optimizer: str = "adamw", channels_last: bool = False) -> Iterator[Trainee]:
    """Build the branch and optimizer the way ``train.py`` does, prepare them, and free everything on exit."""
    from painternet_core.atal import ATALRecorder, install_atal_processors
    from painternet_core.branch import PainterNetBranch
    from training.trainer.optim import build_optimizer

    branch = PainterNetBranch.from_unet(base.unet).to(bench.device, dtype=torch.float32).train()
    branch.requires_grad_(True)
    recorder = None
    if atal:
        recorder = ATALRecorder()
        install_atal_processors(branch, recorder)
    if checkpointing:
        branch.enable_gradient_checkpointing()
        base.unet.enable_gradient_checkpointing()
    else:
        base.unet.disable_gradient_checkpointing()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    base.unet.to(memory_format=memory_format)
    branch.to(memory_format=memory_format)
    opt = build_optimizer(optimizer, [p for p in branch.parameters() if p.requires_grad], lr=1e-5)
    config = branch.config
    prepared, opt = bench.accelerator.prepare(branch, opt)
    item = Trainee(base, prepared, opt, recorder, config, make_batches(resolution, batch_size, 2, bench.device))
    try:
        yield item
    finally:
        # The caller's handle must not keep the branch or optimizer alive into the next configuration.
        item.branch = item.optimizer = item.recorder = item.batches = None
        del prepared, opt, branch
        bench.accelerator.free_memory()
        base.unet.to(memory_format=torch.contiguous_format)
        gc.collect()
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()


def timed_steps(bench: Bench, item: Trainee, count: int) -> list[float]:
    """Seconds of each of ``count`` steps: CUDA events on the GPU's stream, wall clock on the CPU."""
    times = []
    for _ in range(count):
        if bench.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            item.step(bench)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            begin = time.perf_counter()
            item.step(bench)
            times.append(time.perf_counter() - begin)
    return times


def measure(bench: Bench, base: Any, *, batch_size: int, resolution: int, checkpointing: bool, atal: bool,
            optimizer: str = "adamw", channels_last: bool = False) -> dict[str, Any]:
    """Warm-up, then ``bench.steps`` timed steps: median/min/max s/step, samples/s, peak memory, saved bytes, loss.

    An out-of-memory configuration is reported as ``{"status": "oom"}`` and the run goes on."""
    row: dict[str, Any] = {"batch": batch_size, "resolution": resolution, "checkpointing": checkpointing,
                           "atal": atal, "optimizer": optimizer, "channels_last": channels_last}
    try:
        with trainee(bench, base, batch_size=batch_size, resolution=resolution, checkpointing=checkpointing,
                     atal=atal, optimizer=optimizer, channels_last=channels_last) as item:
            begin = time.perf_counter()
            item.step(bench)
            bench.sync()
            row["first_step_s"] = time.perf_counter() - begin
            timed_steps(bench, item, bench.warmup)
            if bench.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(bench.device)
            times = timed_steps(bench, item, bench.steps)
            if bench.device.type == "cuda":
                row["peak_allocated_mib"] = torch.cuda.max_memory_allocated(bench.device) / 2**20
                row["peak_reserved_mib"] = torch.cuda.max_memory_reserved(bench.device) / 2**20
            with saved_bytes() as saved:
                out = item.step(bench)
            bench.sync()
            row.update(status="ok", step_s=statistics.median(times), step_s_min=min(times), step_s_max=max(times),
                       samples_s=batch_size / statistics.median(times), saved_mib=saved[0] / 2**20,
                       loss=float(out.loss.detach()), l_atal=float(out.l_atal))
    except torch.OutOfMemoryError:
        row["status"] = "oom"
        gc.collect()
        torch.cuda.empty_cache()
    return row


# --------------------------------------------------------------------------------------------------------- FLOPs
def count_step_flops(bench: Bench, base: Any, *, batch_size: int, resolution: int, atal: bool) -> dict[str, float]:
    """Model FLOPs of one training step (no gradient checkpointing), and of the forwards that bound it.

    Bounds: the frozen base's backward only computes input gradients (≈ 1× its forward), the branch's computes input
    and weight gradients (≈ 2×), the encoders run forward only; no backward costs more than 2× its forward (fused
    attention backward computes dQ, dK and dV even where only dQ is needed). So
    encoders + base + 2·branch ≤ step ≤ encoders + 3·(base + branch). The branch forward is counted with the ATAL
    recorder on when ATAL is, so the maps' extra attention is inside the bounds."""
    from torch.utils.flop_counter import FlopCounterMode

    from painternet_core.branch import injected
    from painternet_core.conditioning import prepare_condition
    from training.inference import encode_prompts, vae_encoder

    with trainee(bench, base, batch_size=batch_size, resolution=resolution, checkpointing=False,
                 atal=atal) as item:
        item.step(bench)  # optimizer states and lazy inits happen outside the count
        with FlopCounterMode(display=False) as counter:
            item.step(bench)
        step = counter.get_total_flops()
        batch = item.batches[0]
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad(), bench.accelerator.autocast():
            with FlopCounterMode(display=False) as encoders:
                text = encode_prompts(base, batch["prompt"], torch.zeros(batch_size, dtype=torch.bool),
                                      bench.device, bench.weight_dtype, batch)
                image01 = (batch["pixel_values"].float() + 1) / 2
                latents = vae_encoder(base.vae, True, generator)(image01).to(bench.weight_dtype)
                condition = prepare_condition(image01, batch["mask"], vae_encoder(base.vae, True, generator),
                                              item.config).to(bench.weight_dtype)
            t = torch.full((batch_size,), 500, device=bench.device)
            record = item.recorder.record(text.token_mask) if item.recorder is not None else contextlib.nullcontext()
            with FlopCounterMode(display=False) as branch_count, record:
                residuals = item.branch(latents, t, text.hidden_states, condition, text.added_cond_kwargs)
            with FlopCounterMode(display=False) as base_count, injected(base.unet, residuals, 1.0):
                base.unet(latents, t, encoder_hidden_states=text.hidden_states,
                          added_cond_kwargs=text.added_cond_kwargs)
    enc, unet, br = encoders.get_total_flops(), base_count.get_total_flops(), branch_count.get_total_flops()
    return {"step": float(step), "encoders_fwd": float(enc), "base_fwd": float(unet), "branch_fwd": float(br),
            "lower": float(enc + unet + 2 * br), "upper": float(enc + 3 * (unet + br))}


def matmul_tflops(bench: Bench) -> float:
    """Dense matrix-product rate in the compute dtype on this device (mean of timed products after warm-ups)."""
    n = 8192 if bench.device.type == "cuda" else 512
    dtype = bench.weight_dtype
    a = torch.randn(n, n, device=bench.device, dtype=dtype)
    b = torch.randn(n, n, device=bench.device, dtype=dtype)
    for _ in range(3):
        a @ b
    bench.sync()
    reps = 10
    begin = time.perf_counter()
    for _ in range(reps):
        a @ b
    bench.sync()
    return 2 * n**3 * reps / (time.perf_counter() - begin) / 1e12


def profile_step(bench: Bench, base: Any, row: dict[str, Any]) -> dict[str, Any]:
    """Profile one step of ``row``'s configuration: top kernels by self device time, time per kernel class and the
    device's busy fraction of the step (low = host-bound: Python, launches, CPU-side noise draws, syncs)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = bench.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with trainee(bench, base, batch_size=row["batch"], resolution=row["resolution"],
                 checkpointing=row["checkpointing"], atal=row["atal"]) as item:
        item.step(bench)
        bench.sync()
        begin = time.perf_counter()
        with profile(activities=activities) as prof:
            item.step(bench)
            bench.sync()
        wall = time.perf_counter() - begin
    averages = prof.key_averages()

    def self_time(event: Any) -> float:
        if cuda:
            return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))
        return float(event.self_cpu_time_total)

    # On CUDA only the kernel rows (their self time is the kernel's duration); CPU op rows would count it twice.
    kernels = [e for e in averages if self_time(e) > 0
               and (not cuda or e.device_type == torch.autograd.DeviceType.CUDA)]
    total = sum(self_time(e) for e in kernels) or 1.0
    classes: dict[str, float] = {}
    for event in kernels:
        kind = next((name for name, pattern in KERNEL_CLASSES if re.search(pattern, event.key, re.I)), "other")
        classes[kind] = classes.get(kind, 0.0) + self_time(event) / total
    top = sorted(kernels, key=self_time, reverse=True)[:15]
    try:
        table = averages.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=15,
                               max_name_column_width=70)
    except (AttributeError, KeyError, ValueError):  # older profilers name it self_cuda_time_total
        table = averages.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=70)
    return {"table": table,
            "top": [{"name": e.key, "self_ms": self_time(e) / 1000, "share": self_time(e) / total} for e in top],
            "classes": dict(sorted(classes.items(), key=lambda kv: -kv[1])),
            "busy_fraction": min(total / 1e6 / wall, 1.0) if cuda else None, "wall_s": wall}


# ---------------------------------------------------------------------------------------------------- ATAL maps
def explicit_map(query: torch.Tensor, key: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """The naive ATAL map: materialise softmax(QKᵀ/√d) (B, heads, HW, L), average over S and heads."""
    probs = (query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])).softmax(dim=-1)
    weights = token_mask.to(probs.dtype)
    weights = weights / weights.sum(1, keepdim=True).clamp_min(1)
    return (probs * weights[:, None, None, :]).sum(-1).mean(1)


def map_memory(bench: Bench, batch: int, heads: int, pixels: int, head_dim: int) -> dict[str, dict[str, float]]:
    """Explicit vs indicator-SDPA map of one cross-attention layer in the recorder's dtype (fp32): forward +
    backward time, bytes saved for backward, peak memory above the inputs (CUDA), and their max |difference|."""
    from painternet_core.atal import token_mean_attention

    g = torch.Generator().manual_seed(1)
    q0 = torch.randn(batch, heads, pixels, head_dim, generator=g).to(bench.device)
    k0 = torch.randn(batch, heads, 77, head_dim, generator=g).to(bench.device)
    token_mask = torch.zeros(batch, 77, dtype=torch.bool, device=bench.device)
    token_mask[:, 1:12] = True
    out: dict[str, dict[str, float]] = {}
    maps: dict[str, torch.Tensor] = {}
    for name, fn in (("explicit", explicit_map), ("sdpa", token_mean_attention)):
        runs = []
        for _ in range(bench.warmup + bench.steps):
            q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
            if bench.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(bench.device)
            floor = torch.cuda.memory_allocated(bench.device) if bench.device.type == "cuda" else 0
            bench.sync()
            begin = time.perf_counter()
            with saved_bytes() as saved:
                m = fn(q, k, token_mask)
            m.square().sum().backward()
            bench.sync()
            run = {"time_s": time.perf_counter() - begin, "saved_mib": saved[0] / 2**20}
            if bench.device.type == "cuda":
                run["peak_mib"] = (torch.cuda.max_memory_allocated(bench.device) - floor) / 2**20
            runs.append(run)
            maps[name] = m.detach()
        timed = runs[bench.warmup:]
        out[name] = dict(timed[-1], time_s=statistics.median(r["time_s"] for r in timed))
    out["sdpa"]["max_abs_diff"] = float((maps["explicit"] - maps["sdpa"]).abs().max())
    return out


# --------------------------------------------------------------------------------------------------------- smoke
def smoke(bench: Bench, name: str, config_text: str | None, steps: int = 3) -> dict[str, Any]:
    """``accelerate launch --num_processes 1`` of train.py on the tiny SD1.5 preset: ``steps`` steps with a
    checkpoint every step, then a resume from the latest checkpoint for one more step. Checks the log says it resumed
    at the saved step and that both runs exported a branch."""
    out = bench.tmp / f"smoke-{name}"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--dynamo_backend", "no"]
    if config_text is not None:
        config = bench.tmp / f"{name}.yaml"
        config.write_text(config_text, encoding="utf-8")
        launch += ["--config_file", str(config)]
    else:
        launch += ["--mixed_precision", "no" if bench.dry_run else "bf16"]
    if bench.device.type != "cuda":
        launch += ["--cpu"]
    common = [str(REPO / "training" / "trainer" / "train.py"), "--preset", "tiny-sd15", "--output_dir", str(out),
              "--train_batch_size", "2", "--report_to", "none", "--validation_steps", "0",
              "--checkpointing_steps", "1", "--checkpoints_total_limit", "2", "--gradient_checkpointing"]
    result: dict[str, Any] = {"name": name}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    begin = time.perf_counter()
    for phase, extra in (("train", ["--max_train_steps", str(steps)]),
                         ("resume", ["--max_train_steps", str(steps + 1), "--resume_from_checkpoint", "latest"])):
        proc = subprocess.run(launch + common + extra, capture_output=True, text=True, env=env,
                              timeout=max(bench.left(), 60) if math.isfinite(bench.left()) else None,
                              cwd=str(REPO))
        text = proc.stdout + proc.stderr
        result[f"{phase}_rc"] = proc.returncode
        if proc.returncode != 0:
            result["status"] = f"{phase} failed"
            result["tail"] = text[-3000:]
            result["seconds"] = time.perf_counter() - begin
            return result
        if phase == "resume":
            match = re.search(r"resumed from \S+ at step (\d+)", text)
            result["resumed_at"] = int(match.group(1)) if match else None
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    result.update(checkpoints=checkpoints, exported=(out / "painternet.safetensors").is_file(),
                  seconds=time.perf_counter() - begin)
    result["status"] = "ok" if result["resumed_at"] == steps and result["exported"] else "resume not exact"
    return result


# ------------------------------------------------------------------------------------------------------- sections
def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _row_line(row: dict[str, Any]) -> str:
    head = (f"  bs {row['batch']:>2}  gc {'on ' if row['checkpointing'] else 'off'}  atal "
            f"{'on ' if row['atal'] else 'off'}  {row['optimizer']:<17}{' cl' if row['channels_last'] else '   '}")
    if row["status"] != "ok":
        return f"{head}  {row['status']}"
    mfu = f"  MFU {row['mfu'] * 100:5.1f} %" if "mfu" in row else ""
    return (f"{head}  {row['step_s'] * 1000:9.1f} ms/step (min {row['step_s_min'] * 1000:.1f}, max "
            f"{row['step_s_max'] * 1000:.1f})  {row['samples_s']:7.2f} samples/s  peak alloc "
            f"{_mib(row.get('peak_allocated_mib'))} MiB reserved {_mib(row.get('peak_reserved_mib'))} MiB  saved "
            f"{row['saved_mib']:,.1f} MiB  first step {row['first_step_s']:.2f} s{mfu}")


def section_sweep(bench: Bench, base: Any, resolution: int, batches: list[int]) -> list[dict[str, Any]]:
    r = bench.report
    r.say(f"\n## sweep: SD1.5 {resolution}x{resolution}, mixed precision {bench.accelerator.mixed_precision}, "
          f"first step + {bench.warmup} warm-up steps untimed, median of {bench.steps} steps")
    rate = data_rate(resolution, 1.0 if bench.dry_run else 3.0)
    r.data["data_samples_s"] = rate
    r.say(f"  data: one worker's dataset code makes {rate:.1f} samples/s at {resolution}^2")
    rows: list[dict[str, Any]] = []
    r.data["sweep"] = rows
    for batch_size in batches:
        for checkpointing in (False, True):
            for atal in (False, True):
                if bench.left() < 0:
                    r.say(f"  bs {batch_size} gc {checkpointing} atal {atal}: skipped (time budget)")
                    continue
                row = measure(bench, base, batch_size=batch_size, resolution=resolution,
                              checkpointing=checkpointing, atal=atal)
                rows.append(row)
                r.say(_row_line(row))
                r.write()
    return rows


def section_flops(bench: Bench, base: Any, resolution: int, rows: list[dict[str, Any]]) -> None:
    r = bench.report
    r.say(f"\n## flops: FlopCounterMode, one step without checkpointing; peak {bench.peak_tflops:.4g} TFLOP/s")
    counts: dict[str, Any] = {}
    r.data["flops"] = counts
    for atal in (False, True):
        per = {bs: count_step_flops(bench, base, batch_size=bs, resolution=resolution, atal=atal) for bs in (1, 2)}
        one, two = per[1], per[2]
        key = "atal" if atal else "no_atal"
        counts[key] = {"bs1": one, "bs2": two, "per_sample": one["step"], "linearity": two["step"] / (2 * one["step"]),
                       "within_bounds": bool(one["lower"] <= one["step"] <= one["upper"])}
        r.say(f"  ATAL {'on ' if atal else 'off'}: {one['step'] / 1e12:.4f} TFLOP/step at bs 1 (base fwd "
              f"{one['base_fwd'] / 1e12:.4f}, branch fwd {one['branch_fwd'] / 1e12:.4f}, encoders "
              f"{one['encoders_fwd'] / 1e12:.4f}; bounds {one['lower'] / 1e12:.4f}..{one['upper'] / 1e12:.4f}); "
              f"bs 2 / (2 x bs 1) = {counts[key]['linearity']:.4f}")
    for row in rows:
        if row["status"] == "ok":
            flops = counts["atal" if row["atal"] else "no_atal"]["per_sample"] * row["batch"]
            row["model_tflop"] = flops / 1e12
            row["mfu"] = flops / row["step_s"] / (bench.peak_tflops * 1e12)
    ok = [row for row in rows if row["status"] == "ok"]
    if not ok:
        return
    best = max(ok, key=lambda row: row["mfu"])
    counts["best"] = {k: best[k] for k in ("batch", "checkpointing", "atal", "mfu", "samples_s")}
    r.say(f"  best MFU {best['mfu'] * 100:.1f} % (goal {MFU_GOAL * 100:.0f} %): bs {best['batch']}, gc "
          f"{'on' if best['checkpointing'] else 'off'}, ATAL {'on' if best['atal'] else 'off'}")
    if best["mfu"] >= MFU_GOAL:
        return
    if bench.left() < 0:
        r.say("  profile: skipped (time budget)")
        return
    prof = profile_step(bench, base, best)
    counts["profile"] = {k: v for k, v in prof.items() if k != "table"}
    busy = prof["busy_fraction"]
    r.say(f"  profile of that step (wall {prof['wall_s'] * 1000:.1f} ms"
          + (f", device busy {busy * 100:.0f} %" if busy is not None else "") + "): time by kernel class "
          + ", ".join(f"{k} {v * 100:.0f} %" for k, v in prof["classes"].items()))
    r.say(prof["table"])
    levers = [f"{kind} {share * 100:.0f} %: {LEVERS[kind]}" for kind, share in prof["classes"].items() if share >= 0.1]
    if busy is not None and busy < 0.8:
        levers.append(f"device idle {(1 - busy) * 100:.0f} % of the step: host-bound (Python, launches, CPU-drawn "
                      "noise and syncs): larger batch, CUDA graphs / torch.compile")
    counts["levers"] = levers
    for lever in levers:
        r.say(f"  lever: {lever}")
    r.say("  re-measured with the safe changes (same configuration):")
    variants = [("adamw_fused", True)] if bench.dry_run else [("adamw_fused", False), ("adamw", True),
                                                               ("adamw_fused", True)]
    rows_after = []
    for optimizer, channels_last in variants:
        if bench.left() < 0:
            r.say("  variants: skipped (time budget)")
            break
        row = measure(bench, base, batch_size=best["batch"], resolution=resolution,
                      checkpointing=best["checkpointing"], atal=best["atal"], optimizer=optimizer,
                      channels_last=channels_last)
        if row["status"] == "ok":
            row["mfu"] = counts["atal" if row["atal"] else "no_atal"]["per_sample"] * row["batch"] / row[
                "step_s"] / (bench.peak_tflops * 1e12)
        rows_after.append(row)
        r.say(_row_line(row))
    counts["variants"] = rows_after


def section_atal(bench: Bench, rows: list[dict[str, Any]], pixels: int) -> None:
    r = bench.report
    r.say("\n## atal: cost in the step (from the sweep) and one cross-attention map, explicit vs indicator SDPA")
    ratios = []
    for off in rows:
        if off["status"] != "ok" or off["atal"]:
            continue
        on = next((x for x in rows if x["status"] == "ok" and x["atal"] and x["batch"] == off["batch"]
                   and x["checkpointing"] == off["checkpointing"]), None)
        if on is None:
            continue
        ratio = {"batch": off["batch"], "checkpointing": off["checkpointing"], "time": on["step_s"] / off["step_s"],
                 "saved": on["saved_mib"] / max(off["saved_mib"], 1e-9)}
        if "peak_allocated_mib" in off:
            ratio["peak"] = on["peak_allocated_mib"] / off["peak_allocated_mib"]
        ratios.append(ratio)
        r.say(f"  bs {off['batch']:>2} gc {'on ' if off['checkpointing'] else 'off'}: ATAL/no ATAL time "
              f"x{ratio['time']:.3f} (goal <= 1.10), saved-for-backward x{ratio['saved']:.3f}"
              + (f", peak x{ratio['peak']:.3f}" if "peak" in ratio else ""))
    r.data["atal"] = {"step_ratios": ratios, "maps": []}
    for batch in (2, 8):
        maps = map_memory(bench, batch, 8, pixels, 40)
        ex, sd = maps["explicit"], maps["sdpa"]
        entry = {"batch": batch, "heads": 8, "pixels": pixels, "tokens": 77, **{f"{k}_{m}": v for m, d in maps.items()
                                                                              for k, v in d.items()}}
        entry["saved_ratio"] = sd["saved_mib"] / max(ex["saved_mib"], 1e-9)
        if "peak_mib" in ex:
            entry["peak_ratio"] = sd["peak_mib"] / max(ex["peak_mib"], 1e-9)
        r.data["atal"]["maps"].append(entry)
        r.say(f"  map B={batch} heads=8 HW={pixels} L=77 d=40: explicit {ex['time_s'] * 1000:.2f} ms saved "
              f"{ex['saved_mib']:.1f} MiB" + (f" peak {ex['peak_mib']:.1f} MiB" if "peak_mib" in ex else "")
              + f"; SDPA {sd['time_s'] * 1000:.2f} ms saved {sd['saved_mib']:.1f} MiB"
              + (f" peak {sd['peak_mib']:.1f} MiB" if "peak_mib" in sd else "")
              + f"; SDPA/explicit saved x{entry['saved_ratio']:.3f} (goal <= 8/77 = 0.104)"
              + (f", peak x{entry['peak_ratio']:.3f}" if "peak_ratio" in entry else "")
              + f"; max |diff| {sd['max_abs_diff']:.1e}")


def eight_bit_optimizers() -> tuple[list[str], dict[str, str]]:
    """The 8-bit AdamWs the trainer would accept here (bitsandbytes first: torchao compiles on its first step), and
    why each other one is not."""
    from training.trainer.optim import check_optimizer

    found, missing = [], {}
    for name in ("adamw8bit_bnb", "adamw8bit_torchao"):
        try:
            check_optimizer(name)
        except ValueError as error:
            missing[name] = str(error)
        else:
            found.append(name)
    return found, missing


def section_sdxl(bench: Bench, resolution: int) -> None:
    r = bench.report
    eight_bit, missing = eight_bit_optimizers()
    optimizers = ["adamw"] + eight_bit
    r.say(f"\n## sdxl: {resolution}x{resolution}, batch 1, {bench.accelerator.mixed_precision}, gradient "
          f"checkpointing, ATAL on; optimizers {', '.join(optimizers)}")
    for name, reason in missing.items():
        r.say(f"  {name}: not measured: {reason}")
    base = build_base("sdxl", bench)
    params = sum(p.numel() for p in base.unet.parameters())
    r.say(f"  UNet {params / 1e9:.2f} B params (the branch copies it in fp32)")
    rows = []
    r.data["sdxl"] = rows
    for optimizer in optimizers:
        if bench.left() < 0:
            r.say(f"  {optimizer}: skipped (time budget)")
            continue
        row = measure(bench, base, batch_size=1, resolution=resolution, checkpointing=True, atal=True,
                      optimizer=optimizer)
        rows.append(row)
        r.say(_row_line(row))
    del base
    gc.collect()
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()


def section_smoke(bench: Bench) -> None:
    r = bench.report
    r.say("\n## smoke: accelerate launch --num_processes 1 train.py --preset tiny-sd15, 3 steps (checkpoint each) "
          "+ resume 1 step")
    runs: list[tuple[str, str | None]] = []
    if bench.device.type == "cuda":
        runs.append(("fsdp", FSDP_CONFIG))
        import importlib.util

        if importlib.util.find_spec("deepspeed") is not None:
            runs.append(("zero2", ZERO2_CONFIG))
        else:
            r.say("  zero2: skipped (deepspeed not importable)")
    else:
        r.say("  fsdp, zero2: need CUDA (accelerate ignores them on CPU); the dry run launches the plain config")
        runs.append(("plain", None))
    results = []
    r.data["smoke"] = results
    for name, config in runs:
        if bench.left() < 0:
            r.say(f"  {name}: skipped (time budget)")
            continue
        result = smoke(bench, name, config)
        results.append(result)
        r.say(f"  {name}: {result['status']} in {result['seconds']:.0f} s; checkpoints "
              f"{result.get('checkpoints')}, resumed at step {result.get('resumed_at')}, exported "
              f"{result.get('exported')}")
        if "tail" in result:
            r.say("  --- output tail ---\n" + result["tail"])


# ------------------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny presets at 64^2: proves the harness")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder of the log (and .json)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (5 GPU, 1 dry run)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps after the first (timed apart) step (2 GPU, 0 dry run)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="sweep batch sizes (1 2 4 8 GPU)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="after this many seconds, remaining configurations are skipped and logged as such "
                             "(inf: never)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help=f"dense peak for MFU (default: {H200_BF16_TFLOPS:.0f} on an H200, else the measured "
                             "matrix-product rate)")
    parser.add_argument("--mixed-precision", default=None, choices=["no", "bf16"],
                        help="accelerate mixed precision (default bf16 on the GPU, no in the dry run: CPUs without "
                             "bf16 units emulate it tens of times slower)")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> Path:
    """Run the sections; returns the log's path."""
    args = parse_args(argv)
    from accelerate import Accelerator

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --dry-run for the CPU harness check")
    device = torch.device("cuda" if cuda else "cpu")
    mixed_precision = args.mixed_precision or ("bf16" if cuda else "no")
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not cuda)
    weight_dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    report = Report(Path(args.out) / f"gpu_train-{gpu_label(device)}.txt")
    with tempfile.TemporaryDirectory(prefix="gpu_train-") as tmp:
        bench = Bench(device=device, accelerator=accelerator, weight_dtype=weight_dtype, dry_run=args.dry_run,
                      warmup=args.warmup if args.warmup is not None else (0 if args.dry_run else 2),
                      steps=args.steps if args.steps is not None else (1 if args.dry_run else 5),
                      deadline=time.monotonic() + args.budget_s, peak_tflops=0.0, tmp=Path(tmp), report=report)
        measured = matmul_tflops(bench)
        name = device_name(device)
        if args.peak_tflops is not None:
            bench.peak_tflops = args.peak_tflops
        elif cuda and "H200" in name:
            bench.peak_tflops = H200_BF16_TFLOPS
        else:
            bench.peak_tflops = measured
        report.data["machine"] = {"device": name, "cuda": cuda, "cpus": os.cpu_count(), "torch": torch.__version__,
                                  "python": platform.python_version(), "dry_run": args.dry_run,
                                  "matmul_tflops": measured, "peak_tflops": bench.peak_tflops,
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        note = " --dry-run (tiny presets, CPU: numbers describe nothing)" if args.dry_run else ""
        report.say(f"# bench/gpu_train.py{note}")
        report.say(f"machine: {name}, {os.cpu_count()} CPUs, torch {torch.__version__}, Python "
                   f"{platform.python_version()}, {report.data['machine']['started']}")
        report.say(f"dense {str(weight_dtype).removeprefix('torch.')} matrix product measured: {measured:.4g} "
                   f"TFLOP/s; MFU peak {bench.peak_tflops:.4g} TFLOP/s")
        resolution = 64 if args.dry_run else 512
        batches = args.batches or ([1] if args.dry_run else [1, 2, 4, 8])
        rows: list[dict[str, Any]] = []
        if {"sweep", "flops", "atal"} & set(args.sections):
            base = build_base("sd15", bench)
            if "sweep" in args.sections:
                rows = section_sweep(bench, base, resolution, batches)
            if "flops" in args.sections:
                section_flops(bench, base, resolution, rows)
            if "atal" in args.sections:
                section_atal(bench, rows, (resolution // 8) ** 2)
            del base
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        if "smoke" in args.sections:  # before SDXL: torchao's first-step compilation must not starve it
            section_smoke(bench)
        if "sdxl" in args.sections:
            section_sdxl(bench, 64 if args.dry_run else 1024)
        report.data["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        report.say(f"\nfinished {report.data['finished']}")
    return report.path


if __name__ == "__main__":
    main()
