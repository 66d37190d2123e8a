"""Crop & stitch cost per image (painternet_core.crop), single thread, against one SD1.5 sampling step; and the
Crop & stitch picture of the seams (docs/nodes.md) (a synthetic scene, not model output).

Timing: for each image size a smooth synthetic scene with an elliptical hole of 1/8 of the short side at its centre
(grow 8, feather 16, context 0.5, resolution 512, so big images are cropped down and small ones up); the "inpainted"
crop is the crop with new content in the hole and a colour drift everywhere, so every blend mode does its full work.
OpenCV and torch run on one thread. Median of `--repeats` runs after a warm-up.

`--sd15-step` also times one UNet forward of the real SD1.5 architecture (diffusers config of SD1.5, random weights:
speed does not depend on the values) at 512² (64×64 latent) with batch 2, i.e. one cond+uncond sampling step, using
all cores: the target is that stitching a 12-megapixel photo stays well under it.

`--picture PATH` writes the docs figure: the scene with the crop box and the hole, the crop the sampler sees, and
the seam of hard paste / feather / laplacian / poisson, without and with mean_std colour match.

Usage: python bench/crop_stitch.py [--sizes 1024x1024 4032x3024 4096x4096] [--repeats 5] [--sd15-step]
       [--picture docs/crop_stitch.png]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Callable

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from painternet_core import crop as C  # noqa: E402
from painternet_core.config import SD15_UNET  # noqa: E402
from machine import device_name  # noqa: E402

GROW, FEATHER, CONTEXT, CONTEXT_MIN, RESOLUTION = 8, 16, 0.5, 64, 512


def scene(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A synthetic outdoor-like picture in [0, 1]: sky gradient, wavy ground, a few soft discs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    t = yy / max(height - 1, 1)
    img = np.empty((height, width, 3), np.float32)
    img[..., 0] = 0.35 + 0.25 * t
    img[..., 1] = 0.55 + 0.10 * t
    img[..., 2] = 0.90 - 0.35 * t
    horizon = 0.62 * height + 0.04 * height * np.sin(xx / width * 5.0)
    ground = yy > horizon
    img[ground] = np.stack([0.30 + 0.10 * np.sin(xx / 37.0), 0.45 + 0.05 * np.cos(yy / 23.0),
                            0.20 + 0.0 * xx], axis=-1)[ground]
    for _ in range(6):
        cx, cy = rng.uniform(0, width), rng.uniform(0.2, 0.9) * height
        r = rng.uniform(0.03, 0.09) * min(height, width)
        colour = tuple(float(v) for v in rng.uniform(0.1, 0.9, 3))
        cv2.circle(img, (int(cx), int(cy)), int(r), colour, -1, lineType=cv2.LINE_AA)
    return np.clip(cv2.GaussianBlur(img, (0, 0), 1.0), 0.0, 1.0)


def ellipse_hole(height: int, width: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    cv2.ellipse(mask, (int(cx), int(cy)), (max(int(rx), 1), max(int(ry), 1)), 15.0, 0, 360, 1, -1)
    return mask.astype(np.float32)


def fake_inpaint(crops: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """What a sampler + VAE decode might return: the background continued into the hole with a new object (an orange
    disc) in its middle, the hole's colours a little off, and a colour drift of the whole crop (the VAE round trip),
    kept pixels included."""
    out = crops.clone().numpy()
    for i in range(out.shape[0]):
        m = masks[i].numpy() > 0
        ys, xs = np.nonzero(m)
        radius = max(1, int(0.3 * min(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)))
        cv2.circle(out[i], (int(xs.mean()), int(ys.mean())), radius, (0.85, 0.5, 0.2), -1, lineType=cv2.LINE_AA)
        out[i][m] += np.float32([0.08, -0.05, 0.06])
    drift = np.float32([0.04, -0.03, 0.05])
    return torch.from_numpy(np.clip(out * 0.97 + drift, 0.0, 1.0))


def median_ms(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(wall, process CPU) milliseconds, medians over the repeats after one warm-up call. With one thread the CPU
    time is the work itself, steadier than wall time on a shared machine."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return 1000.0 * statistics.median(wall), 1000.0 * statistics.median(cpu)


def time_size(height: int, width: int, repeats: int) -> dict[str, tuple[float, float]]:
    image = torch.from_numpy(scene(height, width))[None]
    side = min(height, width) / 8.0
    mask = torch.from_numpy(ellipse_hole(height, width, width / 2, height / 2, side / 2, side / 3))[None]
    crops, masks, info = C.crop_batch(image, mask, RESOLUTION, CONTEXT, CONTEXT_MIN, GROW, FEATHER)
    inpainted = fake_inpaint(crops, masks)
    row = {"crop": median_ms(lambda: C.crop_batch(image, mask, RESOLUTION, CONTEXT, CONTEXT_MIN, GROW, FEATHER),
                             repeats)}
    for blend in C.BLEND_MODES:
        for match in C.COLOR_MATCH_MODES:
            row[f"{blend}/{match}"] = median_ms(lambda: C.stitch_batch(info, inpainted, blend, match), repeats)
    box = info.boxes[0]
    print(f"{width}x{height}: hole {int(mask.sum())} px, box {box.width}x{box.height} -> crop "
          f"{info.crop_size[0]}x{info.crop_size[1]}", flush=True)
    return row


def sd15_step_seconds(repeats: int) -> tuple[float, float, int]:
    """Median (wall, process CPU) seconds of one SD1.5 UNet forward at a 64x64 latent, batch 2 (cond + uncond),
    fp32, and the torch thread count it ran with."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(SD15_UNET).eval()
    x = torch.randn(2, 4, 64, 64)
    context = torch.randn(2, 77, 768)
    t = torch.tensor([500, 500])
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=context)
        times, cpu = [], []
        for _ in range(repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            unet(x, t, encoder_hidden_states=context)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    print(f"SD1.5 UNet ({params:.0f} M params) forward, 64x64 latent, batch 2, fp32, {torch.get_num_threads()} "
          f"threads: wall {', '.join(f'{v:.2f}' for v in times)} s, process CPU {', '.join(f'{v:.2f}' for v in cpu)} s",
          flush=True)
    return statistics.median(times), statistics.median(cpu), torch.get_num_threads()


def seam_views(image: np.ndarray, mask: np.ndarray, zoom: tuple[int, int, int, int]) -> list[tuple[str, np.ndarray]]:
    y0, y1, x0, x1 = zoom
    views = []
    t_image = torch.from_numpy(image)[None]
    t_mask = torch.from_numpy(mask)[None]
    for blend, feather in (("hard paste", 0), ("feather", FEATHER), ("laplacian", FEATHER), ("poisson", FEATHER)):
        crops, masks, info = C.crop_batch(t_image, t_mask, RESOLUTION, CONTEXT, CONTEXT_MIN, GROW, feather)
        inpainted = fake_inpaint(crops, masks)
        for match in C.COLOR_MATCH_MODES:
            mode = "feather" if blend == "hard paste" else blend
            out = C.stitch_batch(info, inpainted, mode, match)[0].numpy()
            views.append((f"{blend}, {'mean_std' if match != 'none' else 'no colour match'}", out[y0:y1, x0:x1]))
    return views


def label(img: np.ndarray, text: str) -> np.ndarray:
    """An 8-bit copy of a [0, 1] tile with a caption bar (OpenCV draws text on 8-bit images only)."""
    out = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    cv2.rectangle(out, (0, 0), (out.shape[1], 22), (0, 0, 0), -1)
    cv2.putText(out, text, (5, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def picture(path: str) -> None:
    height, width = 640, 960
    image = scene(height, width, seed=3)
    mask = ellipse_hole(height, width, 560, 330, 70, 48)
    t_crops, t_masks, info = C.crop_batch(torch.from_numpy(image)[None], torch.from_numpy(mask)[None], RESOLUTION,
                                          CONTEXT, CONTEXT_MIN, GROW, FEATHER)
    box = info.boxes[0]
    overview = image.copy()
    cv2.rectangle(overview, (box.x0, box.y0), (box.x1 - 1, box.y1 - 1), (1.0, 1.0, 0.0), 2)
    contours, _ = cv2.findContours((mask > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(overview, contours, -1, (1.0, 0.0, 0.0), 2)
    crop_view = fake_inpaint(t_crops, t_masks)[0].numpy().copy()
    contours, _ = cv2.findContours((t_masks[0].numpy() > 0).astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(crop_view, contours, -1, (1.0, 0.0, 0.0), 1)
    zoom = (330 - 70, 330 + 70, 560 - 105, 560 + 105)
    views = seam_views(image, mask, zoom)
    grid_width = 4 * 2 * (zoom[3] - zoom[2])
    tile_h = int(grid_width / (width / height + crop_view.shape[1] / crop_view.shape[0]))
    over = cv2.resize(overview, (tile_h * width // height, tile_h), interpolation=cv2.INTER_AREA)
    cv = cv2.resize(crop_view, (grid_width - over.shape[1], tile_h), interpolation=cv2.INTER_AREA)
    top = np.concatenate([label(over, f"{width}x{height} scene: crop box (yellow), hole (red)"),
                          label(cv, f"crop {info.crop_size[0]}x{info.crop_size[1]}, 'inpainted' (synthetic)")],
                         axis=1)
    tiles = [label(cv2.resize(v, (v.shape[1] * 2, v.shape[0] * 2), interpolation=cv2.INTER_NEAREST), name)
             for name, v in views]
    rows = [np.concatenate(tiles[i::2], axis=1) for i in range(2)]
    grid = np.concatenate(rows, axis=0)
    width_out = max(top.shape[1], grid.shape[1])
    sheet = np.full((top.shape[0] + grid.shape[0], width_out, 3), 255, np.uint8)
    sheet[:top.shape[0], :top.shape[1]] = top
    sheet[top.shape[0]:, :grid.shape[1]] = grid
    cv2.imwrite(path, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"wrote {path} ({sheet.shape[1]}x{sheet.shape[0]})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["1024x1024", "4032x3024", "4096x4096"],
                        help="WIDTHxHEIGHT image sizes (default 1024x1024 4032x3024 4096x4096)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure (default 5)")
    parser.add_argument("--sd15-step", action="store_true", help="also time one real-architecture SD1.5 step")
    parser.add_argument("--picture", default="", help="write the seam picture (docs/crop_stitch.png) to this PNG path")
    args = parser.parse_args()

    if args.picture:
        picture(args.picture)
    step = sd15_step_seconds(2) if args.sd15_step else None
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    print(f"# crop_stitch bench: cpu={device_name()!r} nproc={os.cpu_count()} python={platform.python_version()} "
          f"torch={torch.__version__} opencv={cv2.__version__} threads=1 repeats={args.repeats} "
          f"load={os.getloadavg()[0]:.2f}")
    print(f"# hole: ellipse, 1/8 of the short side; grow {GROW}, feather {FEATHER}, context {CONTEXT}, "
          f"context_min {CONTEXT_MIN}, resolution {RESOLUTION}; stitch times per image, ms (median)")
    rows = {}
    for size in args.sizes:
        width, height = (int(v) for v in size.lower().split("x"))
        rows[size] = time_size(height, width, args.repeats)
    columns = list(next(iter(rows.values())))
    for kind, index in (("wall", 0), ("CPU", 1)):
        print(f"{kind} ms:")
        print("size        " + " ".join(f"{c:>19s}" for c in columns))
        for size, row in rows.items():
            print(f"{size:<11s} " + " ".join(f"{row[c][index]:19.1f}" for c in columns))
    if step is not None:
        print(f"SD1.5 step (cond+uncond, 512², {step[2]} threads): wall {step[0]:.2f} s, "
              f"process CPU {step[1]:.2f} s")
        for size, row in rows.items():
            for kind, index in (("wall", 0), ("CPU", 1)):
                worst = max(v[index] for k, v in row.items() if k != "crop")
                total = (row["crop"][index] + worst) / 1000.0
                print(f"{size} {kind}: crop + slowest stitch = {total:.3f} s = {total / step[index]:.4f} of one "
                      "SD1.5 step")


if __name__ == "__main__":
    main()
