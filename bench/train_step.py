"""Training-step cost of ATAL: step time and memory with and without ATAL, and the explicit attention-map ATAL vs the
indicator-SDPA map (DESIGN §7), all measured in one run so the printed ratios compare like with like.

What is timed is the trainer's branch + base step (branch forward, base forward with the residuals injected, L_diff +
beta*L_ATAL, backward, AdamW step) — the dominant cost; VAE and text encoding are identical with and without ATAL and
left out. Memory is reported two ways: bytes saved for backward (counted with ``saved_tensors_hooks``, the same on any
device) and, on CUDA, ``max_memory_allocated``.

* CPU: tiny SD1.5-shaped models (``painternet_core.config.TINY_SD15_UNET``) at 64² — always runs.
* CUDA (skipped cleanly without it): full-size SD1.5 UNet with random weights, 512², bs 1/2/4, bf16 frozen base,
  fp32 branch under bf16 autocast.

Usage: python bench/train_step.py [--steps N] [--skip-cuda]
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from painternet_core.atal import ATALRecorder, atal_loss, install_atal_processors, token_mean_attention  # noqa: E402
from painternet_core.branch import PainterNetBranch, injected  # noqa: E402


@contextlib.contextmanager
def saved_bytes() -> Iterator[list[int]]:
    """Count the bytes of distinct tensors autograd saves for backward inside the block (activation memory)."""
    seen: set[tuple[int, int]] = set()
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(unet: Any, branch: PainterNetBranch, recorder: ATALRecorder | None, batch: int, latent: int,
              context_dim: int, device: torch.device, dtype: torch.dtype) -> Callable[[], dict[str, float]]:
    """A closure running one training step on fixed random inputs; returns its time and memory figures."""
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, latent, latent, generator=g).to(device, dtype)
    condition = torch.randn(batch, 5, latent, latent, generator=g).to(device, dtype)
    context = torch.randn(batch, 77, context_dim, generator=g).to(device, dtype)
    target = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    token_mask = torch.zeros(batch, 77, dtype=torch.bool, device=device)
    token_mask[:, 1:9] = True
    mask = torch.zeros(batch, 1, latent * 8, latent * 8, device=device)
    mask[..., latent * 2:latent * 6, latent * 2:latent * 5] = 1
    optimizer = torch.optim.AdamW(branch.parameters(), lr=1e-5)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext)

    def step() -> dict[str, float]:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start = time.perf_counter()
        record = recorder.record(token_mask) if recorder is not None else contextlib.nullcontext()
        with record, saved_bytes() as saved:
            with autocast if isinstance(autocast, torch.autocast) else autocast():
                residuals = branch(sample, t, context, condition)
                with injected(unet, residuals, 1.0):
                    pred = unet(sample, t, encoder_hidden_states=context).sample
                    loss = F.mse_loss(pred.float(), target)
                    if recorder is not None:
                        loss = loss + 1e-5 * atal_loss(recorder.ordered_maps(), mask)
                    loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        out = {"time_s": time.perf_counter() - start, "saved_mib": saved[0] / 2**20}
        if device.type == "cuda":
            out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        return out

    return step


def measure(step: Callable[[], dict[str, float]], steps: int) -> dict[str, float]:
    """One warm-up, then the median time over ``steps``; memory of the last step."""
    step()
    runs = [step() for _ in range(steps)]
    times = sorted(r["time_s"] for r in runs)
    out = dict(runs[-1])
    out["time_s"] = times[len(times) // 2]
    return out


def atal_on_off(unet: Any, device: torch.device, dtype: torch.dtype, batch: int, latent: int, context_dim: int,
                steps: int) -> dict[str, dict[str, float]]:
    """The same step with and without ATAL processors, on fresh branches copied from ``unet``."""
    results = {}
    for name, use_atal in (("no_atal", False), ("atal", True)):
        branch = PainterNetBranch.from_unet(unet).to(device=device, dtype=torch.float32).train()
        recorder = None
        if use_atal:
            recorder = ATALRecorder()
            install_atal_processors(branch, recorder)
        results[name] = measure(make_step(unet, branch, recorder, batch, latent, context_dim, device, dtype), steps)
        del branch
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def explicit_map(query: torch.Tensor, key: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """The naive map: materialise softmax(QKᵀ/√d) (B, heads, HW, L), average over S and heads."""
    probs = (query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])).softmax(dim=-1)
    weights = token_mask.to(probs.dtype)
    weights = weights / weights.sum(1, keepdim=True).clamp_min(1)
    return (probs * weights[:, None, None, :]).sum(-1).mean(1)


def map_memory(device: torch.device, batch: int, heads: int, pixels: int, head_dim: int,
               steps: int) -> dict[str, dict[str, float]]:
    """Explicit vs indicator-SDPA map of one cross-attention layer: forward+backward time, saved bytes, peak, error."""
    g = torch.Generator().manual_seed(1)
    q0 = torch.randn(batch, heads, pixels, head_dim, generator=g).to(device)
    k0 = torch.randn(batch, heads, 77, head_dim, generator=g).to(device)
    token_mask = torch.zeros(batch, 77, dtype=torch.bool, device=device)
    token_mask[:, 1:12] = True
    out: dict[str, dict[str, float]] = {}
    maps = {}
    for name, fn in (("explicit", explicit_map), ("sdpa", token_mean_attention)):
        def run() -> dict[str, float]:
            q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            _sync(device)
            start = time.perf_counter()
            with saved_bytes() as saved:
                m = fn(q, k, token_mask)
            m.square().sum().backward()
            _sync(device)
            maps[name] = m.detach()
            r = {"time_s": time.perf_counter() - start, "saved_mib": saved[0] / 2**20}
            if device.type == "cuda":
                r["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            return r
        out[name] = measure(run, steps)
    out["sdpa"]["max_abs_diff"] = float((maps["explicit"] - maps["sdpa"]).abs().max())
    return out


def _row(label: str, r: dict[str, float]) -> str:
    peak = f"  peak {r['peak_mib']:9.1f} MiB" if "peak_mib" in r else ""
    return f"  {label:<28} {r['time_s'] * 1000:9.1f} ms  saved-for-backward {r['saved_mib']:9.1f} MiB{peak}"


def _ratios(a: dict[str, float], b: dict[str, float], label: str) -> str:
    parts = [f"time x{b['time_s'] / a['time_s']:.3f}", f"saved x{b['saved_mib'] / max(a['saved_mib'], 1e-9):.3f}"]
    if "peak_mib" in a:
        parts.append(f"peak x{b['peak_mib'] / max(a['peak_mib'], 1e-9):.3f}")
    return f"  {label}: " + ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median reported)")
    parser.add_argument("--skip-cuda", action="store_true", help="only the CPU part")
    args = parser.parse_args(argv)
    from diffusers import UNet2DConditionModel

    from painternet_core.config import SD15_UNET, TINY_SD15_UNET

    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    tiny = UNet2DConditionModel.from_config(TINY_SD15_UNET).eval().requires_grad_(False)
    print("\n[CPU] tiny SD1.5-shaped branch+UNet step, 64x64 (latent 8x8), batch 2, fp32")
    res = atal_on_off(tiny, cpu, torch.float32, 2, 8, tiny.config.cross_attention_dim, args.steps)
    print(_row("without ATAL", res["no_atal"]))
    print(_row("with ATAL", res["atal"]))
    print(_ratios(res["no_atal"], res["atal"], "ATAL / no ATAL"))
    print("\n[CPU] one cross-attention map, SD1.5 64x64-latent layer shape: B=2, heads=8, HW=4096, L=77, d=40")
    maps = map_memory(cpu, 2, 8, 4096, 40, args.steps)
    print(_row("explicit softmax map", maps["explicit"]))
    print(_row("indicator SDPA map", maps["sdpa"]))
    print(_ratios(maps["explicit"], maps["sdpa"], "SDPA / explicit") + f"; max |diff| {maps['sdpa']['max_abs_diff']:.2e}")

    if args.skip_cuda or not torch.cuda.is_available():
        print("\n[CUDA] skipped: no CUDA device" if not args.skip_cuda else "\n[CUDA] skipped (--skip-cuda)")
        return
    gpu = torch.device("cuda")
    print(f"\n[CUDA] {torch.cuda.get_device_name(gpu)}: full-size SD1.5 UNet (random weights), 512x512, bf16 base, "
          "fp32 branch under bf16 autocast")
    unet = UNet2DConditionModel.from_config(SD15_UNET).eval().requires_grad_(False)
    for bs in (1, 2, 4):
        unet_gpu = unet.to(gpu, torch.bfloat16)
        try:
            res = atal_on_off(unet_gpu, gpu, torch.bfloat16, bs, 64, unet.config.cross_attention_dim, args.steps)
        except torch.cuda.OutOfMemoryError:
            print(f"  bs {bs}: out of memory")
            torch.cuda.empty_cache()
            continue
        print(_row(f"bs {bs} without ATAL", res["no_atal"]))
        print(_row(f"bs {bs} with ATAL", res["atal"]))
        print(_ratios(res["no_atal"], res["atal"], f"bs {bs} ATAL / no ATAL"))
    for bs in (1, 4):
        maps = map_memory(gpu, bs * 2, 8, 4096, 40, args.steps)
        print(_row(f"map explicit (B={bs * 2})", maps["explicit"]))
        print(_row(f"map SDPA (B={bs * 2})", maps["sdpa"]))
        print(_ratios(maps["explicit"], maps["sdpa"], "SDPA / explicit")
              + f"; max |diff| {maps['sdpa']['max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
