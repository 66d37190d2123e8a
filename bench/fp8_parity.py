"""What fp8 storage of a branch costs in accuracy, on full-size random weights (issue 23), on CPU.

PainterNetLoader's `fp8_e4m3fn` / `fp8_e5m2` store the branch's weights in one byte and compute in the activation
dtype through ComfyUI's manual-cast ops (fp32 on CPU). The test suite bounds the error on the tests' tiny branch;
this measures it where rounding has the most layers to grow through: the full-size SD1.5 branch (898 M params) built
by `bench/gpu_inference.py`'s random weights (body at full gain, control points and ACP at its CONTROL_GAIN), patched
into a full-size random SD1.5 UNet. Printed per storage dtype: the branch's resident bytes over fp16's, the worst
relative L2 error of its residuals against fp32 (every control point and ACP output), and the patched model's noise
prediction against the fp32 branch's (max |d| / max |ref| and relative L2) next to what the branch changes at all
(patched fp32 against the base alone), so the error can be read against the branch's own effect.

Usage: python bench/fp8_parity.py [--size 256] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_inference as gi  # noqa: E402
from machine import device_name  # noqa: E402

STORAGE = ("fp16", "fp8_e4m3fn", "fp8_e5m2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH") or os.path.join(gi.REPO, ".cache",
                                                                                            "comfyui"))
    parser.add_argument("--size", type=int, default=256, help="image side in px; the latent is size/8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    mm = gi.setup_comfy(args.comfyui, "cpu")
    import torch

    from harness.comfy_helpers import residual_tensors

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    unet = gi.family_topologies(False)["sd15"]
    branch_sd, config = gi.random_branch_state_dict("sd15", unet, "cpu", args.seed + 20)
    base = gi.build_base("sd15", unet, gi.random_base_state_dict("sd15", unet, "cpu", args.seed + 10), "fp32")
    inputs = gi.make_inputs("sd15", unet, args.size, args.seed)
    build_branch = gi.pack_module("nodes.branch").build_branch
    apply = gi.pack_module("nodes.injection").apply_painternet
    cond = inputs["condition"].repeat(2, 1, 1, 1)
    x = torch.cat([inputs["x"], cond], 1)
    t = torch.full((2,), 500.0)

    def run(dtype: str) -> tuple[int, dict, torch.Tensor]:
        painternet = build_branch(branch_sd, config, dtype=dtype, name=f"random-sd15-{dtype}")
        module = painternet.patcher.model
        nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
        with torch.no_grad():
            residuals = module(x, t, inputs["context"])
        patched = apply(base, painternet, inputs["condition"], 1.0, 0.0, 1.0)
        gi.load_full(patched, inputs)
        eps = gi.predict_noise(patched, inputs)
        gi.unload_all(mm)
        return nbytes, residuals, eps

    ref_bytes, ref, ref_eps = run("fp32")
    gi.load_full(base, inputs)
    base_eps = gi.predict_noise(base, inputs)
    gi.unload_all(mm)
    effect = gi.compare(ref_eps, base_eps)
    rows = {}
    for dtype in STORAGE:
        nbytes, got, eps = run(dtype)
        worst = max(float((b.float() - a).norm() / a.norm())
                    for a, b in zip(residual_tensors(ref), residual_tensors(got)))
        rows[dtype] = (nbytes, worst, gi.compare(eps, ref_eps))

    load = os.getloadavg()
    print(f"# fp8 parity, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {device_name()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {args.threads} thread(s); load average at the end "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; {time.perf_counter() - t0:.0f} s")
    print(f"full-size SD1.5: base UNet and branch ({sum(v.numel() for v in branch_sd.values()) / 1e6:.0f} M params) "
          f"random (bench/gpu_inference.py's weights, seed {args.seed}); {args.size}x{args.size} px, batch [uncond, "
          f"cond], sigma {inputs['sigma']:.2f}; base fp32; the branch computed in fp32 from each storage dtype")
    print(f"what the fp32 branch changes (patched vs base alone): max |d|/max|ref| {effect['rel_max']:.3e}, "
          f"relative L2 {effect['rel_l2']:.3e}")
    print(f"{'storage':<11} {'bytes / fp16':>12} {'worst residual rel L2':>22} {'prediction max|d|/max':>22} "
          f"{'prediction rel L2':>18} {'/ branch effect (L2)':>20}")
    for dtype, (nbytes, worst, pred) in rows.items():
        print(f"{dtype:<11} {nbytes / rows['fp16'][0]:>12.3f} {worst:>22.3e} {pred['rel_max']:>22.3e} "
              f"{pred['rel_l2']:>18.3e} {pred['rel_l2'] / effect['rel_l2']:>20.3f}")
    print(f"fp32 branch bytes {ref_bytes / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
