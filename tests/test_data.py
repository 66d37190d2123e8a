"""Training data: BrushData RLE and shards, rank × worker sharding, folder format, synthetic set, crop conditioning."""
from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from training.inference import sdxl_time_ids
from training.painterdata.shards import MalformedSample, rle_decode
from training.trainer.data import (BrushDataShards, FolderDataset, SyntheticShapes, collate_samples, prepare_sample,
                                   synthetic_scene)
from training.trainer.presets import TINY_WORDS


# ------------------------------------------------------------------------------------------------------ helpers
def rle_encode(mask: np.ndarray) -> list[int]:
    """Reference encoder: 1-based (start, length) runs over the column-major flattening."""
    flat = np.concatenate([[0], mask.reshape(-1, order="F").astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))
    starts, ends = edges[0::2], edges[1::2]
    return [int(v) for pair in zip(starts + 1, ends - starts) for v in pair]


def png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))
    assert ok
    return data.tobytes()


def brush_members(index: int, *, local: str | None = "json", size=(32, 48)) -> dict[str, bytes]:
    scene = synthetic_scene(index, seed=11, size=size)
    members = {
        "image": png(scene.image),
        "caption": scene.caption.encode(),
        "height": str(size[0]).encode(),
        "width": str(size[1]).encode(),
        "segmentation": json.dumps({"mask": [rle_encode(seg) for seg, _ in scene.objects]}).encode(),
    }
    if local == "json":
        members["local_caption"] = json.dumps([text for _, text in scene.objects]).encode()
    elif local == "text":
        members["local_caption"] = scene.objects[0][1].encode()
    return members


def write_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for member, data in members.items():
                info = tarfile.TarInfo(f"{key}.{member}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


# ------------------------------------------------------------------------------------------------------ RLE
def test_rle_decode_column_major_hand_example():
    # 3x4 image; column-major 1-based index of (row, col) is col*3 + row + 1.
    expected = np.array([[0, 0, 1, 0],
                         [1, 0, 0, 0],
                         [1, 0, 0, 1]], dtype=np.uint8)
    rle = [2, 2, 7, 1, 12, 1]
    assert np.array_equal(rle_decode(rle, 3, 4), expected)
    assert np.array_equal(rle_decode("2 2 7 1 12 1", 3, 4), expected)
    assert rle_encode(expected) == rle
    assert rle_decode([], 2, 2).sum() == 0


def test_rle_decode_rejects_bad_runs():
    with pytest.raises(MalformedSample, match="odd"):
        rle_decode([1, 2, 3], 3, 4)
    with pytest.raises(MalformedSample, match="leave"):
        rle_decode([12, 2], 3, 4)
    with pytest.raises(MalformedSample, match="leave"):
        rle_decode([0, 1], 3, 4)
    with pytest.raises(MalformedSample, match="integers"):
        rle_decode(["x", "y"], 3, 4)


# ------------------------------------------------------------------------------------------------------ BrushData
def test_brushdata_reader_decodes_and_skips_malformed(tmp_path):
    samples = {f"s{i:03d}": brush_members(i, local=kind) for i, kind in enumerate(["json", "text", None, "json"])}
    broken = brush_members(9)
    broken["segmentation"] = b'{"mask": [[1, 2, 3]]}'  # odd RLE
    samples["s100"] = broken
    shard = write_shard(tmp_path / "shard-000.tar", samples)
    dataset = BrushDataShards(shard, (32, 48), mask_mode="segmentation", shuffle=False, caption_fallback="global")
    out = list(dataset)
    assert [s["key"] for s in out] == ["s000", "s001", "s002", "s003"]
    assert sum(dataset.skipped.values()) == 1 and dataset.skipped["MalformedSample"] == 1
    for index, sample in enumerate(out):
        scene = synthetic_scene(index, seed=11, size=(32, 48))
        # resolution == image size: no resize, no crop, so the mask must be exactly one decoded object
        assert sample["original_size"] == (32, 48) and sample["crops_coords_top_left"] == (0, 0)
        mask = sample["mask"][0].numpy()
        matches = [text for seg, text in scene.objects if np.array_equal(seg.astype(np.float32), mask)]
        assert matches, "mask is not one of the scene's objects"
        expected_prompt = {0: matches[0], 1: scene.objects[0][1], 2: scene.caption, 3: matches[0]}[index]
        assert sample["prompt"] == expected_prompt and sample["caption"] == scene.caption
        assert sample["atal"] == (index != 2)  # the scene-caption fallback is never trained with ATAL
        image = torch.from_numpy(scene.image).permute(2, 0, 1).float() / 127.5 - 1
        torch.testing.assert_close(sample["pixel_values"], image)


def test_brushdata_default_trains_only_objects_with_a_kept_local_caption(tmp_path):
    """Paper §3.2: local prompts only. An object whose local caption is missing or was rejected (null) is never
    chosen; a sample with no captioned object is skipped and counted, not trained on its scene caption."""
    two = brush_members(3)  # synthetic_scene(3) has two objects
    scene = synthetic_scene(3, seed=11, size=(32, 48))
    assert len(scene.objects) == 2
    two["local_caption"] = json.dumps([None, scene.objects[1][1]]).encode()  # the first was rejected by CLIP
    samples = {"kept": two, "none": brush_members(6, local=None), "text": brush_members(7, local="text")}
    shard = write_shard(tmp_path / "shard.tar", samples)
    for seed in range(4):  # whatever the object draw, only the captioned object comes out
        dataset = BrushDataShards(shard, (32, 48), mask_mode="segmentation", shuffle=False, seed=seed)
        out = {s["key"]: s for s in dataset}
        assert sorted(out) == ["kept", "text"] and dict(dataset.skipped) == {"NoLocalCaption": 1}
        assert out["kept"]["prompt"] == scene.objects[1][1] and out["kept"]["atal"]
        assert np.array_equal(out["kept"]["mask"][0].numpy(), scene.objects[1][0].astype(np.float32))
    batch = collate_samples(list(out.values()))
    assert batch["atal"].dtype == torch.bool and batch["atal"].tolist() == [True, True]
    with pytest.raises(ValueError, match="caption_fallback 'scene'"):
        BrushDataShards(shard, 32, caption_fallback="scene")


def test_repeating_a_stream_with_no_usable_sample_fails_with_the_fix(tmp_path):
    shard = write_shard(tmp_path / "plain.tar", {f"s{i}": brush_members(i, local=None) for i in range(2)})
    stream = iter(BrushDataShards(shard, 32, repeat=True))
    with pytest.raises(RuntimeError, match="--caption_fallback global"):
        next(stream)


def test_brushdata_missing_members_and_size_mismatch_are_skipped(tmp_path):
    no_seg = brush_members(1)
    del no_seg["segmentation"]
    wrong_size = brush_members(2)
    wrong_size["height"] = b"31"
    garbage = brush_members(3)
    garbage["image"] = b"not an image"
    shard = write_shard(tmp_path / "bad.tar", {"a": no_seg, "b": wrong_size, "c": garbage, "d": brush_members(4)})
    dataset = BrushDataShards([shard], 32, shuffle=False)
    assert [s["key"] for s in dataset] == ["d"]
    assert sum(dataset.skipped.values()) == 3


def test_one_shard_reader_for_files_brace_patterns_and_pipe_urls(tmp_path):
    from training.painterdata.shards import iter_shard, list_shards

    for n in range(2):
        write_shard(tmp_path / f"{n:05d}.tar", {f"k{n}": brush_members(n)})
    assert list_shards(str(tmp_path / "{00000..00001}.tar")) == list_shards(tmp_path)
    piped = [s.by_ext() for s in iter_shard(f"pipe:cat {tmp_path / '00001.tar'}")]
    direct = [s.by_ext() for s in iter_shard(tmp_path / "00001.tar")]
    assert piped == direct and sorted(direct[0]) == ["caption", "height", "image", "local_caption", "segmentation",
                                                     "width"]
    dataset = BrushDataShards([f"pipe:cat {tmp_path / '00000.tar'}"], 32, shuffle=False)
    assert [s["key"] for s in dataset] == ["k0"]
    with pytest.raises(ValueError, match="does not exist"):
        list_shards(str(tmp_path / "{00000..00002}.tar"))


def _keys_over_ranks_and_workers(make, world: int = 2, workers: int = 2) -> list[str]:
    keys: list[str] = []
    for rank in range(world):
        loader = DataLoader(make(rank, world), batch_size=2, num_workers=workers, collate_fn=collate_samples)
        keys.extend(key for batch in loader for key in batch["key"])
    return keys


@pytest.mark.parametrize("num_shards", [5, 2], ids=["shard-split", "sample-split-fewer-shards-than-slots"])
def test_brushdata_two_ranks_two_workers_cover_every_sample_once(tmp_path, num_shards):
    expected = []
    for shard in range(num_shards):
        samples = {f"sh{shard}-{i}": brush_members(shard * 10 + i, local=None) for i in range(3)}
        expected.extend(samples)
        write_shard(tmp_path / f"{shard:05d}.tar", samples)
    pattern = str(tmp_path / f"{{00000..{num_shards - 1:05d}}}.tar")
    keys = _keys_over_ranks_and_workers(
        lambda rank, world: BrushDataShards(pattern, 32, rank=rank, world_size=world, shuffle_buffer=4, seed=3,
                                            caption_fallback="global"))
    assert Counter(keys) == Counter(expected)


# ------------------------------------------------------------------------------------------------------ resume
class CountingShapes(SyntheticShapes):
    """SyntheticShapes that counts the samples it builds (scene drawing, crop, mask: the per-sample work)."""

    builds = 0

    def _build(self, record, rng):
        type(self).builds += 1
        return super()._build(record, rng)


def test_resume_at_a_large_position_gives_the_next_samples_without_decoding_the_skipped_ones():
    make = dict(length=300, resolution=32, seed=4, shuffle_buffer=16, repeat=True, image_size=(40, 48))
    stream = iter(CountingShapes(**make))
    consumed = [next(stream) for _ in range(1000)]  # past three epochs of 300
    expected = [next(stream) for _ in range(12)]
    position = consumed[-1]["position"]
    assert position["epoch"] == 3 and len(position["buffer"]) == 15
    CountingShapes.builds = 0
    resumed = CountingShapes(**make)
    resumed.resume({position["slot"]: position})
    stream = iter(resumed)
    got = [next(stream) for _ in range(12)]
    assert [s["key"] for s in got] == [s["key"] for s in expected]
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["mask"], b["mask"])
               for a, b in zip(got, expected))
    # the 15 samples waiting in the shuffle buffer and the ones read since; none of the 1000 consumed
    assert CountingShapes.builds <= 15 + 12


def test_resume_with_dataloader_workers_continues_with_the_next_worker(tmp_path):
    def loader(dataset):
        return DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_samples)

    make = dict(length=40, resolution=32, seed=2, shuffle_buffer=4, repeat=True, image_size=(40, 48))
    straight = iter(loader(SyntheticShapes(**make)))
    consumed = [next(straight) for _ in range(7)]  # odd: the next batch comes from worker 1
    expected = [next(straight)["key"] for _ in range(4)]
    positions = {}
    for batch in consumed:
        for position in batch["position"]:
            positions[position["slot"]] = position
    resumed = SyntheticShapes(**make)
    resumed.resume(positions, rotation=7 % 2)
    again = iter(loader(resumed))
    assert [next(again)["key"] for _ in range(4)] == expected


# ------------------------------------------------------------------------------------------------------ folder
def test_folder_format(tmp_path):
    for index in range(3):
        scene = synthetic_scene(index, seed=5, size=(40, 40))
        seg, local = scene.objects[0]
        cv2.imwrite(str(tmp_path / f"img{index}.png"), scene.image[..., ::-1])
        cv2.imwrite(str(tmp_path / f"img{index}_mask.png"), seg * 255)
        (tmp_path / f"img{index}.txt").write_text(local + "\n")
    (tmp_path / "img0.caption.txt").write_text("a global caption")
    cv2.imwrite(str(tmp_path / "orphan.jpg"), np.zeros((8, 8, 3), np.uint8))  # no mask: skipped, counted
    dataset = FolderDataset(tmp_path, 40, mask_mode="segmentation", shuffle=False)
    out = {s["key"]: s for s in dataset}
    assert sorted(out) == ["img0", "img1", "img2"] and sum(dataset.skipped.values()) == 1
    assert out["img0"]["caption"] == "a global caption"
    assert out["img1"]["prompt"] == out["img1"]["caption"] == synthetic_scene(1, seed=5, size=(40, 40)).objects[0][1]
    seg0 = synthetic_scene(0, seed=5, size=(40, 40)).objects[0][0]
    assert np.array_equal(out["img0"]["mask"][0].numpy(), seg0.astype(np.float32))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        FolderDataset(tmp_path / "empty", 32)


# ------------------------------------------------------------------------------------------------------ synthetic
def test_synthetic_is_deterministic_and_layout_independent():
    def by_key(dataset) -> dict[str, dict]:
        return {s["key"]: s for s in dataset}

    a = by_key(SyntheticShapes(12, 32, seed=4))
    b = by_key(SyntheticShapes(12, 32, seed=4))
    split = by_key(s for rank in range(2) for s in SyntheticShapes(12, 32, seed=4, rank=rank, world_size=2))
    other = by_key(SyntheticShapes(12, 32, seed=5))
    assert sorted(a) == sorted(split) == [f"synthetic-{i:06d}" for i in range(12)]
    for key in a:
        for copy in (b, split):
            assert torch.equal(a[key]["pixel_values"], copy[key]["pixel_values"])
            assert torch.equal(a[key]["mask"], copy[key]["mask"]) and a[key]["prompt"] == copy[key]["prompt"]
    assert any(not torch.equal(a[k]["pixel_values"], other[k]["pixel_values"]) for k in a)
    words = set(TINY_WORDS)
    for sample in a.values():
        assert set(sample["caption"].split()) <= words and set(sample["prompt"].split()) <= words
        assert sample["prompt"] in sample["caption"]
        assert sample["mask"].sum() > 0 and sample["pixel_values"].abs().max() <= 1.0
    # Repeating streams go on past one epoch with new draws.
    stream = iter(SyntheticShapes(3, 32, seed=4, repeat=True))
    assert len([next(stream) for _ in range(7)]) == 7


def test_synthetic_sharding_with_workers_covers_once():
    keys = _keys_over_ranks_and_workers(lambda rank, world: SyntheticShapes(10, 32, rank=rank, world_size=world))
    assert Counter(keys) == Counter(f"synthetic-{i:06d}" for i in range(10))


# ------------------------------------------------------------------------------------------------------ crop
def test_crop_micro_conditioning_comes_from_the_real_crop():
    rng_image = np.random.default_rng(0)
    image = rng_image.integers(0, 256, (100, 200, 3), dtype=np.uint8)
    seg = np.zeros((100, 200), np.uint8)
    seg[50, 150] = 1  # one pixel: the crop must contain it
    for seed in range(5):
        sample = prepare_sample(image, seg, "red star", "a red star", np.random.default_rng(seed), 64,
                                mask_mode="segmentation")
        assert sample["original_size"] == (100, 200) and sample["target_size"] == (64, 64)
        top, left = sample["crops_coords_top_left"]
        resized = cv2.resize(image, (128, 64), interpolation=cv2.INTER_AREA)  # short side 100 → 64
        assert top == 0 and 96 - 63 <= left <= 64
        crop = torch.from_numpy(resized[top:top + 64, left:left + 64].copy()).permute(2, 0, 1).float() / 127.5 - 1
        torch.testing.assert_close(sample["pixel_values"], crop)
        assert sample["mask"].shape == (1, 64, 64) and sample["mask"][0, 32 - top, 96 - left] == 1
    # Upscaling a narrow image: 40x20 → 96x48 (scale 2.4), then a vertical crop to 64x48.
    tops = {prepare_sample(image[:40, :20], np.ones((40, 20), np.uint8), "x", "x", np.random.default_rng(s),
                           (64, 48))["crops_coords_top_left"] for s in range(12)}
    assert all(left == 0 and 0 <= top_ <= 32 for top_, left in tops) and len(tops) > 1
    batch = collate_samples([sample, sample])
    assert sdxl_time_ids(batch).tolist()[0] == [100, 200, top, left, 64, 64]
    assert isinstance(batch["prompt"], list) and batch["pixel_values"].shape == (2, 3, 64, 64)


def test_pipeline_errors_name_the_fix():
    with pytest.raises(ValueError, match="multiples of 8"):
        SyntheticShapes(2, 30)
    with pytest.raises(ValueError, match="mask_mode"):
        SyntheticShapes(2, 32, mask_mode="blob")
    with pytest.raises(ValueError, match="rank"):
        SyntheticShapes(2, 32, rank=2, world_size=2)
    with pytest.raises(MalformedSample, match="empty"):
        prepare_sample(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8)), "p", "c", np.random.default_rng(), 8)
