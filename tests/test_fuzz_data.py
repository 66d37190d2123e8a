"""Property layer over shard samples (issue 21), with hypothesis: the trainer's and the captioner's sample decoding
under random and hostile member bytes, and the shard reader under truncation. Properties: every failure is a
deliberate refusal (``MalformedSample``, counted by the guard), never a ``RecursionError``/``OverflowError``/
``MemoryError``/PIL bomb error; the work spent per sample is bounded before it is spent, counted by spies on the
JSON parser, the image decoder and the RLE decoder (never timed); a truncated shard yields every sample that was
complete before the cut. The memory-limited subprocess check of a 7 GiB member claim is in test_hostile_data.py.
"""
from __future__ import annotations

import io
import json
import tarfile
import types

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from test_data import brush_members, write_shard
from test_hostile_data import DEEP, png_header_bomb
from training.painterdata import shards
from training.painterdata.shards import DamagedShard, ShardSample, iter_shard

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

json_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
deep = st.sampled_from([1, 50, 3000, 100_000]).map(lambda n: b"[" * n + b"]" * n)
rles = st.lists(st.integers(-2**70, 2**70) | st.booleans() | st.floats(allow_nan=False) | json_values, max_size=6)
texts = st.text(max_size=40).map(str.encode)


def _png(height: int, width: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@st.composite
def hostile_members(draw) -> dict[str, bytes]:
    """A BrushData sample whose every member may be valid, random, or one of the issue's hostile forms."""
    members = dict(brush_members(draw(st.integers(0, 5))))
    choice = st.sampled_from
    image = draw(choice(["keep", "random", "bomb", "small"]))
    if image == "random":
        members["image"] = draw(st.binary(max_size=300))
    elif image == "bomb":
        members["image"] = png_header_bomb(draw(st.integers(1, 2**31 - 1)), draw(st.integers(1, 2**31 - 1)))
    elif image == "small":
        members["image"] = _png(draw(st.integers(1, 40)), draw(st.integers(1, 40)))
    for size in ("height", "width"):
        if draw(st.booleans()):
            members[size] = draw(st.integers(-10, 10**40).map(lambda v: str(v).encode()) | texts)
    segmentation = draw(choice(["keep", "rles", "json", "deep"]))
    if segmentation == "rles":
        members["segmentation"] = json.dumps({"mask": draw(st.lists(rles, max_size=3))}).encode()
    elif segmentation == "json":
        members["segmentation"] = json.dumps(draw(json_values)).encode()
    elif segmentation == "deep":
        members["segmentation"] = b'{"mask": ' + draw(deep) + b"}"
    local = draw(choice(["keep", "json", "deep", "text", "drop"]))
    if local == "json":
        members["local_caption"] = json.dumps(draw(json_values)).encode()
    elif local == "deep":
        members["local_caption"] = draw(deep)
    elif local == "text":
        members["local_caption"] = draw(texts)
    elif local == "drop":
        members.pop("local_caption")
    if draw(st.booleans()):
        members["caption"] = draw(texts | json_values.map(lambda v: json.dumps(v).encode()))
    return members


@pytest.fixture()
def work(monkeypatch) -> dict[str, list[int]]:
    """Spies that count the work each decoder is asked to do: bytes handed to the JSON parser, pixels an image
    decoder fills, cells an RLE decode allocates."""
    spent: dict[str, list[int]] = {"json_bytes": [], "pixels": [], "rle_cells": []}
    loads = json.loads

    def counting_loads(text, *args, **kwargs):
        spent["json_bytes"].append(len(text))
        return loads(text, *args, **kwargs)

    monkeypatch.setattr(shards, "json", types.SimpleNamespace(loads=counting_loads, dumps=json.dumps))
    from PIL import ImageFile

    load = ImageFile.ImageFile.load

    def counting_load(self):
        spent["pixels"].append(self.size[0] * self.size[1])
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    rle_decode = shards.rle_decode

    def counting_rle(rle, height, width):
        out = rle_decode(rle, height, width)
        spent["rle_cells"].append(out.size)
        return out

    import training.painterdata.shards as module
    from training.trainer import data

    monkeypatch.setattr(data, "rle_decode", counting_rle)
    monkeypatch.setattr(module, "rle_decode", counting_rle)
    return spent


def _bounded(spent: dict[str, list[int]]) -> None:
    assert all(n <= shards.MAX_JSON_BYTES for n in spent["json_bytes"])
    assert all(n <= shards.MAX_IMAGE_PIXELS for n in spent["pixels"] + spent["rle_cells"])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from training.trainer.data import BrushDataShards

    shard = write_shard(tmp_path_factory.mktemp("fuzz") / "s.tar", {"k": brush_members(0)})
    return BrushDataShards(shard, 32, shuffle=False, caption_fallback="global")


def _sample(members: dict[str, bytes]) -> ShardSample:
    return ShardSample("k", [(f"k.{ext}", payload, tarfile.TarInfo(f"k.{ext}")) for ext, payload in members.items()])


@SETTINGS
@given(members=hostile_members())
def test_trainer_sample_decoding_refuses_or_builds_within_bounds(dataset, work, members):
    dataset.guard.counts.clear()
    out = dataset._build_or_skip({"key": "k", "shard": "s.tar", "sample": _sample(members)}, 0)
    assert set(dataset.guard.counts) <= {"MalformedSample", "NoLocalCaption"}, dict(dataset.guard.counts)
    assert (out is None) == bool(dataset.guard.counts)
    if out is not None:
        assert out["pixel_values"].shape == (3, 32, 32) and out["mask"].shape == (1, 32, 32)
    _bounded(work)


@SETTINGS
@given(members=hostile_members())
def test_captioner_sample_decoding_refuses_or_decodes_within_bounds(work, members):
    from training.painterdata import captions
    from training.painterdata.shards import SampleGuard

    guard = SampleGuard()
    decoded = guard.run("s.tar", "k", lambda: captions._decode_sample(_sample(members).by_ext()))
    assert set(guard.counts) <= {"MalformedSample"}, dict(guard.counts)
    if decoded is not None:
        image, masks = decoded
        assert all(mask.shape == (image.height, image.width) for mask in masks)
    _bounded(work)


@pytest.fixture(scope="module")
def shard_bytes(tmp_path_factory) -> tuple[bytes, list[str], list[int]]:
    """A valid shard, its keys, and for each sample the offset where the reader can hand it out (the end of the
    next sample's first header; for the last sample, the end of its last 512-byte tar block: a cut inside that
    block's padding is a damaged stream, which could have hidden another member of the same sample)."""
    keys = [f"s{i}" for i in range(4)]
    path = write_shard(tmp_path_factory.mktemp("cut") / "s.tar", {k: brush_members(i) for i, k in enumerate(keys)})
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    first = {}
    for member in members:
        first.setdefault(member.name.split(".")[0], member)
    ready = [first[keys[i + 1]].offset + 512 for i in range(len(keys) - 1)]
    ready.append(-(-(members[-1].offset_data + members[-1].size) // 512) * 512)
    return path.read_bytes(), keys, ready


@SETTINGS
@given(fraction=st.floats(0, 1), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=3))
@example(fraction=0.84375, flips=[])  # a cut in the last sample's tar padding (a CI run drew it)
def test_a_cut_or_corrupted_shard_yields_what_came_before_and_only_damaged_shard(shard_bytes, tmp_path_factory,
                                                                                fraction, flips):
    data, keys, ready = shard_bytes
    cut = int(len(data) * fraction)
    damaged = bytearray(data[:cut])
    for where, value in flips:
        if damaged:
            damaged[int(where * (len(damaged) - 1))] = value
    path = tmp_path_factory.mktemp("cut") / "s.tar"
    path.write_bytes(bytes(damaged))
    seen = []
    try:
        for sample in iter_shard(path):
            seen.append(sample.key)
    except DamagedShard:
        pass
    if not flips:
        assert seen == keys[:len(seen)]  # a prefix, in order
        assert len(seen) >= sum(end <= cut for end in ready)  # everything complete before the cut


def test_the_fuzz_strategies_reach_the_hostile_cases(work, dataset):
    """Guards the property tests above against vacuity: the cases the issue names do reach the decoders and are
    refused (the spies see the deep JSON and the bomb header, never a decode of it)."""
    bad = dict(brush_members(0), local_caption=DEEP)
    assert dataset._build_or_skip({"key": "k", "shard": "s", "sample": _sample(bad)}, 0) is None
    bomb = dict(brush_members(0), image=png_header_bomb(), height=b"30000", width=b"30000")
    assert dataset._build_or_skip({"key": "k", "shard": "s", "sample": _sample(bomb)}, 0) is None
    assert len(DEEP) in work["json_bytes"] and 30000 * 30000 not in work["pixels"]
    assert dataset._build_or_skip({"key": "k", "shard": "s", "sample": _sample(brush_members(0))}, 0) is not None
    assert work["pixels"] and work["rle_cells"]
