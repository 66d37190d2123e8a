"""Per-step sampling cost of PainterNet: base model vs base + branch, through ComfyUI's real sampler.

For the SD1.5 and SDXL topologies (the small real-signature UNets of harness/models.py: real channel widths, heads,
context dims and transformer depths, fewer resolution levels) it samples with `comfy.sample.sample` in three settings:
the base alone, the base with PainterNet over the full range, and with PainterNet `end_percent=0.5`. cfg > 1, so the
cond and uncond halves both run (ComfyUI batches them into one model call per step). Settings are timed interleaved
(base, full, half, base, full, half, ...) so machine noise hits all of them, after one untimed 1-step warm-up. The
per-step figure is the time spent inside the base UNet's forward (PainterNet's wrapper runs the branch inside it),
divided by the steps, median over the repeats; the rest of each `sample` call (model loading and patching,
conditioning, sampler bookkeeping) is shown apart as the per-run cost.

The branch is a copy of the UNet's encoder+decoder (no output head) plus 1x1 control convs, run once per step on the
same batch, so full range should cost about 2x the base per step and end_percent=0.5 about 1.5x (the branch runs on
the steps whose sigma is above the 50 % point; the table shows on how many it actually ran, counted by a forward
hook on the branch). Wall time and process CPU time are both reported: on a shared machine the CPU-time ratios are
the steadier ones.

Memory: on CPU, the peak RSS while each setting samples above the RSS when it started (the kernel's high-water mark,
reset per run; base and branch weights stay resident, so this is what sampling itself adds); with ``--exact-memory``
freed tensors leave the RSS at once, which makes it the peak of the tensors live during the run. On CUDA,
torch.cuda.max_memory_allocated per setting (weights included). "full - base" of either is the extra peak the branch
costs, printed against the bytes of one branch call's residuals.

Test weights are deterministic random, generated into .cache/test-models on first use (see harness/models.py).

Usage: python bench/inference_overhead.py [--steps N] [--size 64] [--repeats R] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from typing import Any

from machine import device_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = (("base", None), ("full", 1.0), ("end=0.5", 0.5))
REUSE_SETTINGS = ("every_2", "every_3", "adaptive")  # PainterNetApply's branch_reuse choices, full range


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="sampling steps per run (default 4)")
    parser.add_argument("--size", type=int, default=64, help="image side in px; the latent is size/8 (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per setting, interleaved (default 5)")
    parser.add_argument("--cfg", type=float, default=5.0, help="CFG scale, > 1 so cond and uncond run (default 5)")
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--scheduler", default="normal")
    parser.add_argument("--families", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cpu (default) or cuda; cuda lifts the test harness's CPU forcing")
    parser.add_argument("--branch-dtype", default="fp32", choices=["fp32", "fp16", "bf16", "auto"],
                        help="PainterNet weight dtype (default fp32, the base test models' dtype)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--topology", default="small", choices=["small", "full"],
                        help="small: the real-signature test UNets; full: the real SD1.5/SDXL UNet sizes, random "
                             "weights built in memory (SD1.5: ~3.4 GB base + ~3.6 GB branch in fp32)")
    parser.add_argument("--exact-memory", action="store_true",
                        help="CPU: serve every block >= 64 KiB by mmap so freed tensors leave the RSS, making the peak "
                             "RSS per setting the tensors live in it (slower steps: take timings without it)")
    parser.add_argument("--reuse", nargs="*", default=[], choices=list(REUSE_SETTINGS),
                        help="also time these branch_reuse settings (full range)")
    args = parser.parse_args()
    if args.cfg <= 1.0:
        parser.error("--cfg must be > 1 so both cond and uncond run")
    if args.size % 8:
        parser.error("--size must be a multiple of 8")
    return args


def setup_comfy(device: str) -> None:
    """ComfyUI on sys.path (``harness.use_comfyui``), on the CPU unless --device cuda, chosen before
    model_management is imported (that import picks the device once)."""
    sys.path.insert(0, REPO)
    from harness import use_comfyui

    use_comfyui(cpu=device != "cuda")
    import comfy.model_management as mm

    if device == "cuda" and mm.get_torch_device().type != "cuda":
        raise SystemExit("--device cuda: ComfyUI found no CUDA device")


class PeakRSS:
    """Peak resident set size of this process while the block runs: the kernel's high-water mark (``VmHWM``), reset to
    the current RSS on entry (``harness.memory``), so no short peak between polls is missed. ``start`` is the RSS on
    entry. glibc keeps freed blocks below its mmap threshold in the heap, so unless ``--exact-memory`` lowered that
    threshold a block freed and reused inside the block may not show; with it, every freed tensor leaves the RSS."""

    def __enter__(self) -> "PeakRSS":
        from harness.memory import reset_peak

        self.start = reset_peak()
        self.peak = self.start
        return self

    def __exit__(self, *exc: Any) -> None:
        from harness.memory import status_bytes

        self.peak = status_bytes("VmHWM")


def exact_memory() -> None:
    """Have glibc serve every block of 64 KiB or more by its own mmap (``mallopt(M_MMAP_THRESHOLD, 65536)``, which
    also stops the threshold from adapting), so a freed tensor leaves the RSS at once and the RSS peak of a step is the
    tensors live in it. Costs a page-fault pass per large allocation, so timings taken this way are slower."""
    import ctypes

    if ctypes.CDLL("libc.so.6").mallopt(-3, 65536) != 1:  # M_MMAP_THRESHOLD
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed: --exact-memory needs glibc")


def conditioning(family: str, size: int, gen: Any) -> list:
    import torch

    if family == "sd15":
        return [[torch.randn(1, 77, 768, generator=gen), {}]]
    return [[torch.randn(1, 77, 2048, generator=gen), {
        "pooled_output": torch.randn(1, 1280, generator=gen), "width": size, "height": size, "crop_w": 0,
        "crop_h": 0, "target_width": size, "target_height": size}]]


def build(family: str, args: argparse.Namespace) -> dict[str, Any]:
    """Base ModelPatcher, PainterNet branch, and the three model variants with their inputs."""
    import comfy.supported_models as sm
    import torch

    from harness.comfy_helpers import pack_module, residual_tensors
    from harness.models import SD15_SMALL_UNET, SDXL_SMALL_UNET, branch_file, comfy_model

    branch_mod = pack_module("nodes.branch")
    if args.topology == "full":
        from painternet_core.checkpoint import reference_shapes
        from painternet_core.config import SD15_UNET, SDXL_UNET, PainterNetConfig

        unet = {"sd15": SD15_UNET, "sdxl": SDXL_UNET}[family]
        config = PainterNetConfig(family=family, unet=unet)
        base = comfy_model({"sd15": sm.SD15, "sdxl": sm.SDXL}[family],
                           branch_mod.comfy_unet_config(unet, in_channels=4))
        g = torch.Generator().manual_seed(args.seed)
        state = {k: torch.randn(shape, generator=g) * 0.02 for k, shape in sorted(reference_shapes(config).items())}
        painternet = branch_mod.build_branch(state, config, args.branch_dtype, name=f"full-{family}")
        del state
    else:
        config_cls, unet_config = {"sd15": (sm.SD15, SD15_SMALL_UNET), "sdxl": (sm.SDXL, SDXL_SMALL_UNET)}[family]
        base = comfy_model(config_cls, unet_config)
        painternet = branch_mod.load_painternet(
            branch_file(family, f"tiny-{family}-320-branch.safetensors"), args.branch_dtype)
    branch_mod.check_base(base, painternet.config)
    gen = torch.Generator().manual_seed(args.seed)
    lat = args.size // 8
    condition = torch.randn(1, 5, lat, lat, generator=gen)
    condition[:, 4] = 0.0
    condition[:, 4, lat // 4: 3 * lat // 4, lat // 4: 3 * lat // 4] = 1.0  # a centred hole
    apply = pack_module("nodes.injection").apply_painternet
    models = {name: base if end is None else apply(base, painternet, condition, 1.0, 0.0, end)
              for name, end in SETTINGS}
    rule = pack_module("nodes.painternet_nodes").branch_reuse_rule
    models.update({name: apply(base, painternet, condition, 1.0, 0.0, 1.0, reuse=rule(name)) for name in args.reuse})
    calls = [0]
    residual_bytes = [0]

    def count(module: Any, inputs: Any, out: dict[str, Any]) -> None:
        calls[0] += 1
        residual_bytes[0] = sum(t.numel() * t.element_size() for t in residual_tensors(out))

    painternet.patcher.model.register_forward_hook(count)
    return {
        "models": models, "calls": calls, "residual_bytes": residual_bytes, "timer": UNetTimer(base.model.diffusion_model, args.device == "cuda"),
        "positive": conditioning(family, args.size, gen), "negative": conditioning(family, args.size, gen),
        "latent": torch.zeros(1, 4, lat, lat),
        "base_params": sum(p.numel() for p in base.model.diffusion_model.parameters()),
        "branch_params": sum(p.numel() for p in painternet.patcher.model.parameters()),
        "branch_dtype": str(painternet.patcher.model.compute_dtype).replace("torch.", ""),
    }


class UNetTimer:
    """Wall and process-CPU seconds spent inside the base UNet's forward (forward pre-hook / hook on the shared
    `diffusion_model`): with PainterNet applied that includes the branch, which the DIFFUSION_MODEL wrapper runs inside
    that forward. The rest of a `sample` call (model loading and patching, conditioning, sampler bookkeeping) is the
    per-run overhead."""

    def __init__(self, module: Any, cuda: bool) -> None:
        self.cuda = cuda
        self.wall = self.cpu = 0.0
        self.calls = 0
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _now(self) -> tuple[float, float]:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    def _pre(self, *_: Any) -> None:
        self._start = self._now()

    def _post(self, *_: Any) -> None:
        wall, cpu = self._now()
        self.wall += wall - self._start[0]
        self.cpu += cpu - self._start[1]
        self.calls += 1

    def reset(self) -> None:
        self.wall = self.cpu = 0.0
        self.calls = 0


def sample_once(model: Any, parts: dict[str, Any], args: argparse.Namespace, steps: int) -> float:
    """One `comfy.sample.sample` call; returns its wall seconds (the UNet time accumulates in parts["timer"])."""
    import comfy.sample
    import torch

    noise = comfy.sample.prepare_noise(parts["latent"], args.seed)
    if args.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = comfy.sample.sample(model, noise, steps, args.cfg, args.sampler, args.scheduler, parts["positive"],
                              parts["negative"], parts["latent"], denoise=1.0, disable_pbar=True, seed=args.seed)
    if args.device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if not torch.isfinite(out).all():
        raise RuntimeError("sampling produced non-finite latents")
    return elapsed


def measure(family: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    import comfy.model_management as mm
    import torch

    parts = build(family, args)
    timer = parts["timer"]
    names = [name for name, _ in SETTINGS] + list(args.reuse)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    overhead: dict[str, list[float]] = {name: [] for name in names}
    peaks: dict[str, int] = {name: 0 for name in names}
    calls: dict[str, int] = {name: 0 for name in names}
    # Warm-up, 1 step with the branch on: loads base and branch, first-call allocations.
    sample_once(parts["models"]["full"], parts, args, 1)
    for _ in range(args.repeats):
        for name in names:
            parts["calls"][0] = 0
            timer.reset()
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                total = sample_once(parts["models"][name], parts, args, args.steps)
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated())
            else:
                with PeakRSS() as rss:
                    total = sample_once(parts["models"][name], parts, args, args.steps)
                peaks[name] = max(peaks[name], rss.peak - rss.start)
            if timer.calls != args.steps:
                raise RuntimeError(f"{timer.calls} UNet calls for {args.steps} steps: cond and uncond were split")
            wall[name].append(timer.wall / args.steps)
            cpu[name].append(timer.cpu / args.steps)
            overhead[name].append(total - timer.wall)
            calls[name] = parts["calls"][0]
    base_wall, base_cpu = statistics.median(wall["base"]), statistics.median(cpu["base"])
    rows = []
    for name in names:
        rows.append({"family": family, "setting": name, "s_step": statistics.median(wall[name]),
                     "min": min(wall[name]), "max": max(wall[name]), "ratio": statistics.median(wall[name]) / base_wall,
                     "cpu_step": statistics.median(cpu[name]), "cpu_ratio": statistics.median(cpu[name]) / base_cpu,
                     "overhead": statistics.median(overhead[name]), "branch_calls": calls[name], "peak": peaks[name],
                     "base_params": parts["base_params"], "branch_params": parts["branch_params"],
                     "branch_dtype": parts["branch_dtype"], "residual_bytes": parts["residual_bytes"][0]})
    del parts, timer
    mm.unload_all_models()
    mm.cleanup_models_gc()
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    args = parse_args()
    setup_comfy(args.device)
    import comfy.model_management as mm
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = mm.get_torch_device()
    if args.exact_memory and device.type != "cuda":
        exact_memory()
    name = device_name(device)
    print(f"PainterNet inference overhead: {device} ({name}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, os.cpu_count {os.cpu_count()}, load average at start "
          f"{' '.join(format(x, '.2f') for x in os.getloadavg())}")
    print(f"{args.size}x{args.size} px image ({args.size // 8}x{args.size // 8} latent), batch 1, {args.steps} steps "
          f"{args.sampler}/{args.scheduler}, cfg {args.cfg} (cond+uncond in one call per step), {args.repeats} "
          f"interleaved repeats after a 1-step warm-up; base fp32, branch {args.branch_dtype}; topology "
          f"{args.topology}; branch_reuse settings timed: {', '.join(args.reuse) or 'none'}"
          + ("; glibc mmap threshold 64 KiB (--exact-memory)" if args.exact_memory and device.type != "cuda" else ""))
    rows = []
    t0 = time.perf_counter()
    for family in args.families:
        rows += measure(family, args)
    mem = "CUDA peak" if device.type == "cuda" else "peak RSS+"
    print()
    print("s/step: wall seconds per step inside the UNet forward (branch included), median over the repeats (min-max);"
          " cpu s/step: the same in process CPU seconds (all threads), steadier on a shared machine; per run: the rest"
          " of each sample call (model loading/patching, conditioning, sampler), median")
    print(f"{'topology':<8} {'setting':<8} {'s/step':>8} {'(min-max)':>17} {'x base':>6} {'cpu s/step':>10} "
          f"{'x base':>6} {'per run s':>9} {'branch calls':>12} {mem + ' MiB':>13}")
    for r in rows:
        span = f"({r['min']:.3f}-{r['max']:.3f})"
        ran = f"{r['branch_calls']}/{args.steps}"
        print(f"{r['family']:<8} {r['setting']:<8} {r['s_step']:>8.3f} {span:>17} {r['ratio']:>6.2f} "
              f"{r['cpu_step']:>10.3f} {r['cpu_ratio']:>6.2f} {r['overhead']:>9.3f} {ran:>12} "
              f"{r['peak'] / 2**20:>13.0f}")
    print()
    for family in args.families:
        got = {x["setting"]: x for x in rows if x["family"] == family}
        res = got["full"]["residual_bytes"]
        extra = got["full"]["peak"] - got["base"]["peak"]
        if device.type == "cuda" or args.exact_memory:
            print(f"{family}: one branch call's residuals (all control points + ACP, cond+uncond rows) "
                  f"{res / 2**20:.1f} MiB; {mem} full - base {extra / 2**20:.1f} MiB = {extra / max(res, 1):.2f}x "
                  "the residual bytes (residuals are kept unscaled and added with the scale folded in, so the "
                  "branch's own forward transients and the held residuals are all it adds)")
        else:
            print(f"{family}: one branch call's residuals {res / 2**20:.1f} MiB; the extra peak is not measured "
                  "without --exact-memory (glibc reuses freed heap blocks without a trace in the RSS)")
        print(f"{family}: base UNet {got['base']['base_params'] / 1e6:.0f} M params, branch "
              f"{got['base']['branch_params'] / 1e6:.0f} M ({got['base']['branch_dtype']})")
        for name, r in got.items():
            if name in ("base", "full"):
                continue
            frac = r["branch_calls"] / args.steps
            print(f"{family}: {name} ran the branch on {r['branch_calls']}/{args.steps} steps, so from the full-range "
                  f"cost it should be {1 + (got['full']['ratio'] - 1) * frac:.2f}x wall / "
                  f"{1 + (got['full']['cpu_ratio'] - 1) * frac:.2f}x cpu; measured {r['ratio']:.2f}x / "
                  f"{r['cpu_ratio']:.2f}x")
    if device.type != "cuda":
        import resource

        print(f"process peak RSS (ru_maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB "
              "(both topologies' weights, never freed to the OS)")
    print(f"total wall time {time.perf_counter() - t0:.0f} s, load average at end "
          f"{' '.join(format(x, '.2f') for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
