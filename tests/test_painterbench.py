"""PainterBench: region metrics, Grounding-DINO rules, CLIP and aesthetic scores, the benchmark (manifest) builder,
BranchGenerator and the evaluation CLI, on tiny random models.

The tiny CLIP and Grounding DINO, the images and the PainterData shard writer are shared with test_painterdata.py
(painter_fixtures.py); expected values are computed independently of the code under test (manual CLIP forward,
hand-computed MSE/PSNR, hand-placed crops).
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from painter_fixtures import (PROJECTION, REPO, ColourCaptioner, FirstWordsShortener, coloured_sample, manual_cosine,
                              noise_image, torchrun, write_shard)
from training.painterbench import evaluate
from training.painterbench import manifest as bench_manifest
from training.painterdata import captions
from training.painterbench.metrics import (
    PSNR_CAP_DB,
    AestheticScorer,
    ClipScorer,
    GroundingDinoScorer,
    box_iou,
    crop_mask_region,
    grounding_hit,
    load_aesthetic_head,
    normalize_phrase,
    phrase_matches,
    mask_bbox,
    square_crop,
    unmasked_region_metrics,
)


# ------------------------------------------------------------------------------------------------------------------
# crop, padding and region metrics
# ------------------------------------------------------------------------------------------------------------------

def test_square_crop_pads_centred_with_black_extra_pixel_bottom_right() -> None:
    array = np.arange(6 * 10 * 3, dtype=np.uint8).reshape(6, 10, 3) % 200 + 50  # no black pixel anywhere
    image = Image.fromarray(array)
    wide = np.asarray(square_crop(image, (2, 1, 7, 3)))  # 5 wide, 2 tall -> 3 rows of padding: 1 top, 2 bottom
    assert wide.shape == (5, 5, 3)
    assert (wide[0] == 0).all() and (wide[3:] == 0).all()
    np.testing.assert_array_equal(wide[1:3], array[1:3, 2:7])
    tall = np.asarray(square_crop(image, (4, 0, 6, 5)))  # 2 wide, 5 tall -> 1 column left, 2 right
    assert tall.shape == (5, 5, 3)
    assert (tall[:, 0] == 0).all() and (tall[:, 3:] == 0).all()
    np.testing.assert_array_equal(tall[:, 1:3], array[0:5, 4:6])
    with pytest.raises(ValueError, match="not inside"):
        square_crop(image, (0, 0, 11, 3))


def test_crop_mask_region_uses_exclusive_bbox() -> None:
    mask = np.zeros((6, 10), np.float32)
    mask[2, 3] = mask[4, 5] = 1.0
    assert mask_bbox(mask) == (3, 2, 6, 5)
    image = Image.fromarray(np.full((6, 10, 3), 255, np.uint8))
    assert crop_mask_region(image, mask).size == (3, 3)
    with pytest.raises(ValueError, match="mask is empty"):
        mask_bbox(np.zeros((4, 4)))


def test_unmasked_region_metrics_identical_known_and_full_mask() -> None:
    reference = np.zeros((8, 8, 3), np.uint8)
    mask = np.zeros((8, 8), np.float32)
    mask[2:5, 2:6] = 1.0
    generated = reference.copy()
    generated[2:5, 2:6] = 255  # only the hole differs
    same = unmasked_region_metrics(generated, reference, mask)
    assert same.mse == 0.0 and same.psnr == PSNR_CAP_DB == 100.0
    generated[mask == 0] = 51  # 51/255 = 0.2 everywhere outside the hole -> MSE 0.04, PSNR 10*log10(25)
    known = unmasked_region_metrics(Image.fromarray(generated), Image.fromarray(reference), mask)
    assert known.mse == pytest.approx(0.04, abs=1e-12)
    assert known.psnr == pytest.approx(10 * math.log10(25.0), abs=1e-9)
    part = generated.copy()
    part[:4][mask[:4] == 0] = 0  # kept pixels of the top 4 rows now match the reference
    still_off = int((mask[4:] == 0).sum())  # 32 - 4 = 28 of the 64 - 12 = 52 kept pixels still differ by 0.2
    assert unmasked_region_metrics(part, reference, mask).mse == pytest.approx(0.04 * still_off / 52, abs=1e-12)
    full = unmasked_region_metrics(generated, reference, np.ones((8, 8)))
    assert math.isnan(full.mse) and math.isnan(full.psnr)
    assert unmasked_region_metrics(generated, reference, mask, psnr_cap=5.0).psnr == 5.0


def test_grounding_rule_on_given_boxes() -> None:
    region = (10, 10, 30, 30)
    assert box_iou(region, region) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert grounding_hit([], region) == (False, 0.0)
    hit, iou = grounding_hit([(0, 0, 5, 5), (10, 10, 30, 24)], region)  # 20x14 inside 20x20 -> IoU 0.7
    assert hit and iou == pytest.approx(0.7)
    hit, iou = grounding_hit([(10, 10, 30, 19)], region)  # IoU 0.45 < 0.5
    assert not hit and iou == pytest.approx(0.45)
    assert grounding_hit([(10, 10, 30, 19)], region, iou_threshold=0.4)[0]
    with pytest.raises(ValueError, match="iou_threshold=0"):
        grounding_hit([], region, iou_threshold=0.0)


def test_grounding_dino_scorer_applies_the_rule_to_its_detections(gdino_dir: Path) -> None:
    scorer = GroundingDinoScorer(gdino_dir, box_threshold=0.0, text_threshold=0.0)
    image = noise_image(1)
    detections = scorer.detect(image, "A red car")
    assert detections and all(phrase for _, _, phrase in detections)
    assert [score for _, score, _ in detections] == sorted((s for _, s, _ in detections), reverse=True)
    mask = np.zeros((40, 48), np.float32)
    x0, y0, x1, y1 = (int(round(v)) for v in detections[0][0])
    mask[max(y0, 0):max(y1, y0 + 1), max(x0, 0):max(x1, x0 + 1)] = 1.0
    hit, iou = scorer.evaluate(image, "A red car", mask)
    expected = grounding_hit([box for box, _, _ in detections], mask_bbox(mask))
    assert (hit, iou) == (expected[0], pytest.approx(expected[1]))
    strict = GroundingDinoScorer(gdino_dir, box_threshold=1.0, text_threshold=1.0)
    assert strict.evaluate(image, "a red car", mask) == (False, 0.0)
    assert GroundingDinoScorer.query(" A Red Car ") == "a red car."



def test_phrase_match_rule() -> None:
    assert normalize_phrase("A red car.") == "red car" and normalize_phrase("[CLS] the  Red CAR") == "cls red car"
    assert phrase_matches("red car", "a red car") and phrase_matches("a red car .", "A Red Car")
    assert not phrase_matches("car", "a red car")  # found a car, not the red car asked for
    assert not phrase_matches("red car blue", "a red car") and not phrase_matches("", "a")


def test_gdino_paper_rule_detects_on_the_mask_crop_and_matches_the_phrase(gdino_dir: Path) -> None:
    """The paper's rule (§4.1): the generated region is cut out by the mask, the detector runs on that crop with the
    local prompt, and the item is a hit when a predicted phrase matches the prompt."""
    image = noise_image(3)
    mask = np.zeros((40, 48), np.float32)
    mask[5:25, 20:44] = 1.0
    scorer = GroundingDinoScorer(gdino_dir, box_threshold=0.0, text_threshold=0.0)
    crop = image.crop(mask_bbox(mask))
    assert crop.size == (24, 20)
    on_crop = scorer.detect(crop, "a red car")
    assert scorer.crop_hit(image, "a red car", mask) == any(phrase_matches(p, "a red car") for _, _, p in on_crop)
    assert scorer.crop_hit(image, "a red car", mask)  # threshold 0: the whole prompt is every phrase
    # the detector sees only the crop: painting outside the mask's box changes nothing
    outside = np.asarray(image).copy()
    outside[30:, :] = 0
    assert scorer.detect(Image.fromarray(outside).crop(mask_bbox(mask)), "a red car") == on_crop
    picky = GroundingDinoScorer(gdino_dir, box_threshold=0.0, text_threshold=1.0)  # no token passes: no phrase
    assert not picky.crop_hit(image, "a red car", mask)


# ------------------------------------------------------------------------------------------------------------------
# CLIP, aesthetic head, CLIP filter
# ------------------------------------------------------------------------------------------------------------------

def test_clip_cosine_matches_manual_forward(clip: ClipScorer, clip_dir: Path) -> None:
    images = [noise_image(2), noise_image(3, 30, 50)]
    texts = ["a red circle", "blue square on the background"]
    got = clip.cosine(images, texts)
    for image, text, value in zip(images, texts, got):
        assert float(value) == pytest.approx(manual_cosine(clip_dir, image, text), abs=1e-5)
    with pytest.raises(ValueError, match="one text per image"):
        clip.cosine(images, texts[:1])


def test_aesthetic_heads_both_formats(clip: ClipScorer, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(1)
    dims = [PROJECTION, 12, 6, 1]
    mlp = {}
    for n, (i, o) in enumerate(zip(dims[:-1], dims[1:])):
        mlp[f"layers.{2 * n}.weight"] = torch.randn(o, i)  # LAION's MLP has dropout between: even indices only
        mlp[f"layers.{2 * n}.bias"] = torch.randn(o)
    torch.save(mlp, tmp_path / "mlp.pth")
    linear = {"weight": torch.randn(1, PROJECTION), "bias": torch.randn(1)}
    save_file(linear, str(tmp_path / "linear.safetensors"))
    images = [noise_image(4), noise_image(5)]
    embeds = clip.image_embeds(images)
    assert torch.allclose(embeds.norm(dim=-1), torch.ones(2), atol=1e-6)
    expected = embeds
    for n in range(3):
        expected = expected @ mlp[f"layers.{2 * n}.weight"].T + mlp[f"layers.{2 * n}.bias"]
    torch.testing.assert_close(AestheticScorer(tmp_path / "mlp.pth", clip).score(images), expected[:, 0])
    torch.testing.assert_close(AestheticScorer(tmp_path / "linear.safetensors", clip).score(images),
                               (embeds @ linear["weight"].T + linear["bias"])[:, 0])
    torch.save({"weight": torch.randn(1, 768), "bias": torch.randn(1)}, tmp_path / "wide.pth")
    with pytest.raises(ValueError, match="768-d embeddings"):
        AestheticScorer(tmp_path / "wide.pth", clip)
    torch.save({"fc.weight": torch.randn(1, 4)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="unexpected key 'fc.weight'"):
        load_aesthetic_head(tmp_path / "bad.pth")


# ------------------------------------------------------------------------------------------------------------------
# benchmark builder and the evaluation CLI
# ------------------------------------------------------------------------------------------------------------------

def make_source(tmp_path: Path, count: int) -> Path:
    folder = tmp_path / "source"
    folder.mkdir()
    lines = []
    for n in range(count):
        noise_image(100 + n).save(folder / f"img{n}.png")
        seg = np.zeros((40, 48), np.uint8)
        seg[10 + n % 5:26, 12:30 + n % 7] = 255
        Image.fromarray(seg).save(folder / f"seg{n}.png")
        lines.append(json.dumps({"image": f"img{n}.png", "segmentation": f"seg{n}.png", "local_prompt": "a red car",
                                 "global_prompt": "a red car on the street", "category": "ab"[n % 2]}))
    (folder / "source.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "source.jsonl"


def test_mask_modes_balanced_per_category_and_deterministic() -> None:
    categories = ["a"] * 7 + ["b"] * 5
    modes = bench_manifest.assign_mask_modes(categories, seed=3)
    for category in "ab":
        counts = [sum(1 for c, m in zip(categories, modes) if c == category and m == kind)
                  for kind in ("segmentation", "box", "irregular")]
        assert max(counts) - min(counts) <= 1 and sum(counts) == categories.count(category)
    assert bench_manifest.assign_mask_modes(categories, seed=3) == modes
    assert any(bench_manifest.assign_mask_modes(categories, seed=s) != modes for s in range(4, 10))


def test_build_benchmark_writes_manifest_and_masks(tmp_path: Path) -> None:
    items = bench_manifest.read_source_manifest(make_source(tmp_path, 6))
    manifest = bench_manifest.build_benchmark(items, tmp_path / "bench", seed=1)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [r["id"] for r in records] == [f"img{n}" for n in range(6)]
    assert sorted(r["mask_mode"] for r in records) == ["box"] * 2 + ["irregular"] * 2 + ["segmentation"] * 2
    for record, item in zip(records, items):
        mask = np.asarray(Image.open(tmp_path / "bench" / record["mask"]))
        assert set(np.unique(mask)) <= {0, 255} and mask.any()
        seg = item.segmentation > 0
        if record["mask_mode"] == "segmentation":
            np.testing.assert_array_equal(mask > 0, seg)
        else:
            assert (mask[seg] == 255).all()  # box and irregular masks contain the object
    again = bench_manifest.build_benchmark(items, tmp_path / "bench2", seed=1)
    assert again.read_text() == manifest.read_text()
    for record in records:
        assert (tmp_path / "bench" / record["mask"]).read_bytes() == (tmp_path / "bench2" / record["mask"]).read_bytes()
    bench_items = evaluate.read_manifest(tmp_path / "bench")
    assert [i.mask_mode for i in bench_items] == [r["mask_mode"] for r in records]


def test_evaluate_cli_columns_values_and_skips(clip_dir: Path, gdino_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    items = bench_manifest.read_source_manifest(make_source(tmp_path, 3))
    bench_manifest.build_benchmark(items, tmp_path / "bench", seed=0)
    bench = evaluate.read_manifest(tmp_path / "bench")
    generated = tmp_path / "generated"
    generated.mkdir()
    for n, item in enumerate(bench):
        image = np.asarray(item.load_image()).copy()
        hole = item.load_mask() > 0.5
        image[hole] = 255 - image[hole]  # repaint the hole only
        if n == 1:
            image[~hole] = np.clip(image[~hole].astype(int) + 10, 0, 255)  # and disturb the kept region once
        Image.fromarray(image).save(generated / f"{item.id}.png")
    torch.manual_seed(2)
    torch.save({"weight": torch.randn(1, PROJECTION), "bias": torch.zeros(1)}, tmp_path / "head.pth")
    out = tmp_path / "eval"
    code = evaluate.main(["--manifest", str(tmp_path / "bench"), "--generated", str(generated), "--out_dir", str(out),
                          "--clip", str(clip_dir), "--aesthetic_head", str(tmp_path / "head.pth"),
                          "--gdino", str(gdino_dir), "--gdino_box_threshold", "0", "--gdino_text_threshold", "0",
                          "--no_progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| group | n | clip_sim |")
    with (out / "per_image.csv").open() as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames == ["id", "mask_mode", "mask_area", "local_prompt", "global_prompt", "clip_sim",
                                 "clip_sim_global", "local_clip_sim", "aesthetic", "gdino_crop_hit", "psnr", "mse"]
    assert [r["id"] for r in rows] == [i.id for i in bench]
    assert float(rows[0]["psnr"]) == 100.0 and float(rows[0]["mse"]) == 0.0
    assert float(rows[1]["psnr"]) < 100.0 and float(rows[1]["mse"]) > 0.0
    # thresholds 0: every prompt token is in every phrase, so the paper's crop rule hits on every item
    assert [r["gdino_crop_hit"] for r in rows] == ["1.0"] * 3
    gen0 = Image.open(generated / f"{bench[0].id}.png").convert("RGB")
    crop = crop_mask_region(gen0, bench[0].load_mask())
    assert float(rows[0]["local_clip_sim"]) == pytest.approx(100 * manual_cosine(clip_dir, crop, "a red car"),
                                                             abs=1e-3)
    assert float(rows[0]["clip_sim"]) == pytest.approx(100 * manual_cosine(clip_dir, gen0, "a red car"), abs=1e-3)
    assert float(rows[0]["clip_sim_global"]) == pytest.approx(
        100 * manual_cosine(clip_dir, gen0, "a red car on the street"), abs=1e-3)
    with (out / "summary.csv").open() as handle:
        summary = list(csv.DictReader(handle))
    assert summary[0]["group"] == "all" and summary[0]["n"] == "3"
    assert float(summary[0]["psnr"]) == pytest.approx(np.mean([float(r["psnr"]) for r in rows]))
    assert {s["group"] for s in summary[1:]} == {r["mask_mode"] for r in rows}

    pixels_only = tmp_path / "pixels"
    assert evaluate.main(["--manifest", str(tmp_path / "bench" / "manifest.jsonl"), "--generated", str(generated),
                          "--out_dir", str(pixels_only), "--limit", "2", "--no_progress"]) == 0
    with (pixels_only / "per_image.csv").open() as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["id", "mask_mode", "mask_area", "local_prompt", "global_prompt", "psnr", "mse"]
        assert len(list(reader)) == 2

    merged = evaluate.merge_results([out / "per_image.csv", pixels_only / "per_image.csv"])
    assert len(merged) == 3 and merged[2]["clip_sim"] == pytest.approx(float(rows[2]["clip_sim"]))

    (generated / f"{bench[2].id}.png").unlink()
    with pytest.raises(FileNotFoundError, match=bench[2].id):
        evaluate.evaluate(bench, evaluate.FolderGenerator(generated), evaluate.MetricSuite(), progress=False)
    assert len(evaluate.evaluate(bench, evaluate.FolderGenerator(generated), evaluate.MetricSuite(),
                                 skip_missing=True, progress=False)) == 2


class RepaintGenerator:
    """A Generator that is not a folder: proves the protocol is all the evaluator needs."""

    def generate(self, item: evaluate.BenchItem) -> Image.Image:
        return item.load_image().resize((24, 20))


def test_metric_suite_scores_the_local_prompt_by_default_and_both_gdino_rules(clip: ClipScorer, gdino_dir: Path,
                                                                              tmp_path: Path) -> None:
    import dataclasses

    bench_manifest.build_benchmark(bench_manifest.read_source_manifest(make_source(tmp_path, 1)), tmp_path / "b")
    (item,) = evaluate.read_manifest(tmp_path / "b")
    image, mask = item.load_image(), item.load_mask()
    gdino = GroundingDinoScorer(gdino_dir, box_threshold=0.0, text_threshold=0.0)
    both = evaluate.MetricSuite(gdino=gdino, gdino_rule="both", pixel_metrics=False)
    assert both.columns() == ["gdino_crop_hit", "gdino_iou_hit", "gdino_iou"]
    hit, iou = gdino.evaluate(image, item.local_prompt, mask)
    assert both.score(item, image, image, mask) == {"gdino_crop_hit": float(gdino.crop_hit(image, item.local_prompt,
                                                                                           mask)),
                                                    "gdino_iou_hit": float(hit), "gdino_iou": iou}
    assert evaluate.MetricSuite(gdino=gdino, gdino_rule="iou", pixel_metrics=False).columns() == ["gdino_iou_hit",
                                                                                                  "gdino_iou"]
    assert evaluate.MetricSuite(gdino=gdino).columns()[0] == "gdino_crop_hit"  # the paper's rule by default
    with pytest.raises(ValueError, match="gdino_rule='box'"):
        evaluate.MetricSuite(gdino_rule="box")

    class PromptLog:
        def __init__(self) -> None:
            self.prompts: list[str] = []

        def score(self, prompt: str, image: Image.Image) -> float:
            self.prompts.append(prompt)
            return float(len(prompt))

    reward = PromptLog()
    suite = evaluate.MetricSuite(clip=clip, image_reward=reward, pixel_metrics=False)
    row = suite.score(item, image, image, mask)
    assert row["clip_sim"] == pytest.approx(100 * float(clip.cosine([image], [item.local_prompt])[0]), abs=1e-4)
    assert row["clip_sim_global"] == pytest.approx(100 * float(clip.cosine([image], [item.global_prompt])[0]),
                                                   abs=1e-4)
    assert reward.prompts == [item.local_prompt, item.global_prompt]
    assert (row["image_reward"], row["image_reward_global"]) == (len(item.local_prompt), len(item.global_prompt))
    local_only = suite.score(dataclasses.replace(item, global_prompt=""), image, image, mask)
    assert math.isnan(local_only["clip_sim_global"]) and math.isnan(local_only["image_reward_global"])
    assert local_only["clip_sim"] == pytest.approx(row["clip_sim"])


def test_generator_protocol_and_resize(tmp_path: Path) -> None:
    items = bench_manifest.read_source_manifest(make_source(tmp_path, 1))
    bench_manifest.build_benchmark(items, tmp_path / "bench", seed=0)
    generator = RepaintGenerator()
    assert isinstance(generator, evaluate.Generator)
    rows = evaluate.evaluate(evaluate.read_manifest(tmp_path / "bench"), generator, evaluate.MetricSuite(),
                             progress=False)
    assert len(rows) == 1 and 0.0 < rows[0]["mse"] < 1.0  # resized back to 48x40 before comparing


def test_image_reward_flag_errors_clearly_when_package_missing(tmp_path: Path) -> None:
    try:
        import ImageReward  # noqa: F401
        pytest.skip("image-reward is installed here")
    except ImportError:
        pass
    items = bench_manifest.read_source_manifest(make_source(tmp_path, 1))
    bench_manifest.build_benchmark(items, tmp_path / "bench", seed=0)
    (tmp_path / "ir.pt").write_bytes(b"x")
    (tmp_path / "med.json").write_text("{}")
    result = subprocess.run([sys.executable, str(REPO / "training" / "painterbench" / "evaluate.py"), "--manifest",
                             str(tmp_path / "bench"), "--generated", str(tmp_path / "bench" / "images"), "--out_dir",
                             str(tmp_path / "out"), "--image_reward", str(tmp_path / "ir.pt"),
                             "--image_reward_med_config", str(tmp_path / "med.json")],
                            capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 2
    assert "optional `image-reward` package" in result.stderr and "--merge" in result.stderr


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    for module in (evaluate, captions, bench_manifest):
        with pytest.raises(SystemExit) as exit_info:
            module.main(["--help"])
        assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--gdino_iou", "--limit", "--device", "--threshold", "--captioner", "--seed"):
        assert flag in help_text



def test_old_kebab_case_flags_still_work_with_a_deprecation_warning(tmp_path: Path) -> None:
    """The four CLIs spell flags in snake_case; 0.1's --kebab-case spellings are accepted for one release, each with
    a FutureWarning naming the new spelling (``--flag=value`` too), and give the same result."""
    from training.cli import normalize_flags
    from training.trainer import train

    source = make_source(tmp_path, 2)
    with pytest.warns(FutureWarning, match="--min-area is deprecated .* use --min_area"):
        assert bench_manifest.main(["--source", str(source), "--out-dir", str(tmp_path / "old"),
                                    "--min-area=0.02"]) == 0
    bench_manifest.main(["--source", str(source), "--out_dir", str(tmp_path / "new")])
    assert (tmp_path / "old" / "manifest.jsonl").read_text() == (tmp_path / "new" / "manifest.jsonl").read_text()
    generated = tmp_path / "old" / "images"
    with pytest.warns(FutureWarning, match="--no-progress"):
        assert evaluate.main(["--manifest", str(tmp_path / "old"), "--generated", str(generated), "--out-dir",
                              str(tmp_path / "eval"), "--no-progress"]) == 0
    assert (tmp_path / "eval" / "per_image.csv").is_file()
    parser = captions.build_parser()
    with pytest.warns(FutureWarning, match="--captioner-prompt"):
        argv = normalize_flags(parser, ["--captioner-prompt", "a picture of", "--", "--out-dir"])
    assert argv == ["--captioner_prompt", "a picture of", "--", "--out-dir"]  # nothing after a bare --
    with pytest.warns(FutureWarning, match="--train-batch-size"):
        assert train.parse_args(["--preset", "tiny-sd15", "--train-batch-size", "3"]).train_batch_size == 3


def test_manifest_errors_name_the_problem(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "x.png", "local_prompt": "a"}) + "\n")
    with pytest.raises(ValueError, match="lacks mask"):
        evaluate.read_manifest(tmp_path / "m.jsonl")
    with pytest.raises(ValueError, match="no manifest.jsonl or manifest.csv"):
        evaluate.read_manifest(tmp_path)
    folder = tmp_path / "plain"
    folder.mkdir()
    noise_image(9).save(folder / "cat.jpg")
    Image.fromarray(np.pad(np.full((10, 10), 255, np.uint8), ((5, 25), (5, 33)))).save(folder / "cat_mask.png")
    (folder / "cat.txt").write_text("a cat\n")
    (folder / "cat.caption.txt").write_text("a cat on a sofa")
    noise_image(10).save(folder / "lonely.png")  # no mask, no prompt: skipped
    (item,) = evaluate.read_manifest(folder)
    assert (item.id, item.local_prompt, item.global_prompt) == ("cat", "a cat", "a cat on a sofa")
    assert item.load_mask().sum() == 100 and mask_bbox(item.load_mask()) == (5, 5, 15, 15)


def test_lpips_on_unmasked_region(tmp_path: Path) -> None:
    pytest.importorskip("lpips")
    import torchvision

    from training.painterbench.metrics import LpipsScorer

    torch.manual_seed(0)
    features = {k: v for k, v in torchvision.models.alexnet().state_dict().items() if k.startswith("features.")}
    torch.save(features, tmp_path / "alex.pth")
    scorer = LpipsScorer(tmp_path / "alex.pth")
    reference = noise_image(8, 64, 64)
    mask = np.zeros((64, 64), np.float32)
    mask[16:48, 16:48] = 1.0
    generated = np.asarray(reference).copy()
    generated[16:48, 16:48] = 0
    assert scorer.distance(Image.fromarray(generated), reference, mask) == pytest.approx(0.0, abs=1e-6)
    generated[:8] = 255
    assert scorer.distance(Image.fromarray(generated), reference, mask) > 0.0


def test_benchmark_from_painterdata_shards(tmp_path: Path) -> None:
    source = tmp_path / "in"
    source.mkdir()
    write_shard(source / "shard-000.tar")
    captions.process_shards([source], tmp_path / "painterdata", ColourCaptioner(), FirstWordsShortener(),
                            progress=False)
    (item,) = bench_manifest.read_painterdata_shards([tmp_path / "painterdata"], seed=0, min_area=0.01)
    index = int(item.id.rsplit("_", 1)[1])
    assert item.id.startswith("s0_000_") and index in (0, 2)
    assert item.local_prompt == ("red square" if index == 0 else "blue square")
    assert item.global_prompt == "two colours" and item.image_suffix == ".png"
    np.testing.assert_array_equal(item.segmentation, coloured_sample()[1][index])
    assert not list(bench_manifest.read_painterdata_shards([tmp_path / "painterdata"], seed=0, min_area=0.9))


@pytest.fixture(scope="module")
def branch_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD1.5 diffusers base and a PainterNet branch file of it whose control points are non-zero (a
    zero-initialised branch would leave the base alone and hide a branch that is not used)."""
    from painternet_core.branch import PainterNetBranch
    from painternet_core.checkpoint import save_branch
    from training.inference import load_base_model
    from training.trainer.presets import save_tiny_pipeline

    root = tmp_path_factory.mktemp("branch-generator")
    save_tiny_pipeline(root / "base", "sd15", seed=0)
    branch = PainterNetBranch.from_unet(load_base_model(root / "base").unet)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in branch.named_parameters():
            if name.startswith(("layer_control", "attention_control")):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    save_branch(str(root / "branch.safetensors"), branch.state_dict(), branch.config)
    return root


def test_branch_generator_runs_the_reference_pipeline_and_keeps_the_source_outside_the_hole(
        branch_files: Path, tmp_path: Path) -> None:
    from training.inference import inpaint

    generator = evaluate.BranchGenerator(branch_files / "branch.safetensors", branch_files / "base", steps=2, seed=3,
                                         resolution=64, save_dir=tmp_path / "generated")
    assert generator.prompt == "local"  # "auto" on a PainterNet branch
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255
    noise_image(7, 64, 64).save(tmp_path / "img.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    item = evaluate.BenchItem("a", tmp_path / "img.png", tmp_path / "mask.png", "a red car", "a street", "box")
    out = np.asarray(generator.generate(item))
    source = np.asarray(item.load_image())
    hole = mask > 127
    assert np.array_equal(out[~hole], source[~hole]) and not np.array_equal(out[hole], source[hole])
    # The hole is the reference loop's raw decode for the local prompt, at the generator's seed and step count.
    image = torch.from_numpy(source.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        raw = inpaint(generator.base, generator.branch, image, torch.from_numpy(hole.astype(np.float32))[None, None],
                      "a red car", config=generator.branch.config, seed=3, num_inference_steps=2,
                      guidance_scale=7.5, paste_back=False)
    want = (raw[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(out[hole], want[hole])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "generated" / "a.png")), out)
    assert np.array_equal(np.asarray(generator.generate(item)), out)  # seeded: the same image every time
    # Ids from a shared manifest name the saved files: hostile ones stay inside --save_generated (issue 21).
    victim = tmp_path / "victim"
    victim.mkdir()
    for hostile in ["../victim/payload", "/abs/x", "a\x00b", "k" * 600]:
        generator.generate(evaluate.BenchItem(hostile, item.image_path, item.mask_path, "a red car"))
    saved = sorted((tmp_path / "generated").iterdir())
    assert len(saved) == 5 and not list(victim.iterdir()) and all(p.suffix == ".png" for p in saved)
    global_prompt = evaluate.BranchGenerator(branch_files / "branch.safetensors", branch_files / "base", steps=2,
                                             seed=3, prompt="global", resolution=64)
    assert not np.array_equal(np.asarray(global_prompt.generate(item))[hole], out[hole])

    # Any size, thin strokes included: generated at 64x64 (a multiple of 64, about 64² px), returned at the item's
    # size, and every hole pixel is generated (a stroke thinner than the downscale still covers working pixels).
    noise_image(8, 150, 111).save(tmp_path / "odd.png")
    odd_mask = np.zeros((111, 150), np.uint8)
    odd_mask[5:100:6, 10:140] = 255  # 1-px lines every 6 rows: most fall between the rows a nearest resize keeps
    Image.fromarray(odd_mask).save(tmp_path / "odd_mask.png")
    odd = evaluate.BenchItem("odd", tmp_path / "odd.png", tmp_path / "odd_mask.png", "a red car")
    result = np.asarray(generator.generate(odd))
    assert result.shape == (111, 150, 3)
    assert np.array_equal(result[odd_mask == 0], np.asarray(odd.load_image())[odd_mask == 0])
    # Every source hole pixel lies in a working hole pixel (a nearest-pixel downscale drops most of these lines).
    work = evaluate.working_mask(odd_mask / 255.0, (64, 64))
    back = np.asarray(Image.fromarray(work.astype(np.uint8)).resize((150, 111), Image.NEAREST))
    assert (back[odd_mask > 0] == 1).all()
    nearest = np.asarray(Image.fromarray(odd_mask).resize((64, 64), Image.NEAREST).resize((150, 111), Image.NEAREST))
    assert (nearest[odd_mask > 0] == 0).any()  # ...which is what makes the coverage rule necessary


@pytest.mark.parametrize("size, multiple, resolution, expected", [
    ((50, 37), 64, 0, (64, 64)),        # the item's own size, at least one multiple
    ((100, 170), 64, 0, (128, 192)),    # nearest multiples (1.56 -> 2, 2.66 -> 3)
    ((64, 64), 64, 512, (512, 512)),    # scaled up to the family's training area
    ((1024, 768), 64, 512, (576, 448)),  # 4:3 at ~512² px: 591 x 443
    ((1000, 1000), 32, 1024, (1024, 1024)),
])
def test_generation_size(size, multiple, resolution, expected) -> None:
    assert evaluate.generation_size(*size, multiple, resolution) == expected


def test_branch_generator_refuses_a_branch_of_another_family(branch_files: Path, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    from painternet_core.branch import PainterNetBranch
    from painternet_core.checkpoint import save_branch
    from painternet_core.config import TINY_SDXL_UNET

    sdxl = PainterNetBranch.from_unet(UNet2DConditionModel.from_config(TINY_SDXL_UNET))
    save_branch(str(tmp_path / "sdxl.safetensors"), sdxl.state_dict(), sdxl.config)
    with pytest.raises(ValueError, match="sdxl branch but the base .* is sd15"):
        evaluate.BranchGenerator(tmp_path / "sdxl.safetensors", branch_files / "base")
    with pytest.raises(ValueError, match="resolution=-1"):
        evaluate.BranchGenerator(branch_files / "branch.safetensors", branch_files / "base", resolution=-1)
    with pytest.raises(ValueError, match="prompt='caption'"):
        evaluate.BranchGenerator(branch_files / "branch.safetensors", branch_files / "base", prompt="caption")


def test_evaluate_cli_generates_with_a_branch(branch_files: Path, tmp_path: Path) -> None:
    items = bench_manifest.read_source_manifest(make_source(tmp_path, 2))
    bench_manifest.build_benchmark(items, tmp_path / "bench", seed=0)
    out, generated = tmp_path / "eval", tmp_path / "generated"
    assert evaluate.main(["--manifest", str(tmp_path / "bench"), "--branch", str(branch_files / "branch.safetensors"),
                          "--base", str(branch_files / "base"), "--steps", "1", "--resolution", "64",
                          "--save_generated", str(generated),
                          "--out_dir", str(out), "--no_progress"]) == 0
    with (out / "per_image.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    ids = [item.id for item in evaluate.read_manifest(tmp_path / "bench")]
    assert [row["id"] for row in rows] == ids
    assert all(float(row["mse"]) == 0.0 and float(row["psnr"]) == 100.0 for row in rows)  # source kept exactly
    assert sorted(path.stem for path in generated.glob("*.png")) == sorted(ids)
    for argv in (["--generated", str(generated), "--branch", str(branch_files / "branch.safetensors"),
                  "--base", str(branch_files / "base")],
                 ["--branch", str(branch_files / "branch.safetensors")]):
        with pytest.raises(SystemExit):
            evaluate.main(["--manifest", str(tmp_path / "bench"), "--out_dir", str(out), *argv])


@pytest.mark.slow
def test_evaluation_spread_over_two_processes(tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 2` (CPU): each rank scores its own items; the merged tables equal a one-process run,
    rows in manifest order."""
    bench_manifest.build_benchmark(bench_manifest.read_source_manifest(make_source(tmp_path, 5)), tmp_path / "b")
    argv = ["--manifest", str(tmp_path / "b"), "--generated", str(tmp_path / "b" / "images"), "--no_progress"]
    assert evaluate.main(argv + ["--out_dir", str(tmp_path / "eval1")]) == 0
    code, text = torchrun("training/painterbench/evaluate.py", argv + ["--out_dir", str(tmp_path / "eval2")],
                          tmp_path / "evaluate.log")
    assert code == 0, text[-4000:]
    assert "rank 0/2 scored 3 items" in text and "rank 1/2 scored 2 items" in text
    for name in ("per_image.csv", "summary.csv", "summary.md"):
        assert (tmp_path / "eval2" / name).read_text() == (tmp_path / "eval1" / name).read_text()
