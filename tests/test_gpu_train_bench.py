"""bench/gpu_train.py --dry-run: the GPU training benchmark's harness, run with the same code on CPU with the tiny
presets, must produce a complete, well-formed log (every section, finite numbers, a positive FLOP count that is linear
in the batch and inside the bounds its counted forwards set), and the 8-bit optimizer option must be wired into the
trainer. Timings are never asserted."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import torch_threads
from training.trainer import train
from training.trainer.optim import OPTIMIZERS, build_optimizer, check_optimizer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    """One dry run of every section in a fresh process (accelerate's state is per process), with no time budget: on a
    slow or busy machine the sections take longer, they are never skipped for it (the timeout is a hang guard)."""
    out = tmp_path_factory.mktemp("gpu_train")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_train.py"), "--dry-run", "--out", str(out),
                           "--budget-s", "inf"], capture_output=True, text=True, env=env, timeout=7200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = out / "gpu_train-cpu-dry-run.txt"
    return log.read_text(encoding="utf-8"), json.loads(log.with_suffix(".json").read_text(encoding="utf-8"))


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.mark.slow
def test_dry_run_log_has_every_section_with_finite_numbers(dry_run):
    text, data = dry_run
    for header in ("## sweep", "## flops", "## atal", "## sdxl", "## smoke"):
        assert header in text
    assert "skipped (time budget)" not in text
    assert data["machine"]["dry_run"] is True and _finite(data["machine"]["matmul_tflops"])
    rows = data["sweep"]
    assert {(r["checkpointing"], r["atal"]) for r in rows} == {(False, False), (False, True), (True, False),
                                                                (True, True)}
    for row in rows + data["sdxl"]:
        assert row["status"] == "ok"
        for key in ("step_s", "samples_s", "saved_mib", "first_step_s", "loss"):
            assert _finite(row[key]) and row[key] >= 0, (key, row)
        assert row["samples_s"] == pytest.approx(row["batch"] / row["step_s"])
    for row in rows:
        assert _finite(row["mfu"]) and 0 < row["mfu"]
    # Checkpointing keeps fewer activations for backward, whatever the device.
    saved = {(r["checkpointing"], r["atal"]): r["saved_mib"] for r in rows}
    assert saved[(True, False)] < saved[(False, False)] and saved[(True, True)] < saved[(False, True)]
    assert [r["optimizer"] for r in data["sdxl"]][0] == "adamw"


@pytest.mark.slow
def test_dry_run_flop_count_is_positive_linear_and_bounded(dry_run):
    _, data = dry_run
    for key in ("no_atal", "atal"):
        flops = data["flops"][key]
        one = flops["bs1"]
        assert one["step"] > 0 and one["base_fwd"] > 0 and one["branch_fwd"] > 0 and one["encoders_fwd"] > 0
        assert flops["linearity"] == pytest.approx(1.0, abs=0.02)
        assert one["lower"] <= one["step"] <= one["upper"]
        assert flops["within_bounds"] is True
    # ATAL's map adds attention work, never removes any.
    assert data["flops"]["atal"]["per_sample"] > data["flops"]["no_atal"]["per_sample"]
    best = data["flops"]["best"]
    assert _finite(best["mfu"]) and best["mfu"] > 0  # a timing: reported in the log, never a pass/fail bound
    prof = data["flops"]["profile"]
    assert prof["top"] and all(_finite(k["self_ms"]) for k in prof["top"])
    assert sum(prof["classes"].values()) == pytest.approx(1.0)
    assert data["flops"]["levers"]  # seven classes share the time, so one has >= 1/7 and gets its lever
    assert data["flops"]["variants"] and data["flops"]["variants"][0]["status"] == "ok"


@pytest.mark.slow
def test_dry_run_atal_maps_agree_and_smoke_resumes(dry_run):
    _, data = dry_run
    for entry in data["atal"]["maps"]:
        assert entry["max_abs_diff_sdpa"] < 1e-5
        assert entry["saved_mib_explicit"] > 0 and entry["saved_mib_sdpa"] > 0
    assert data["atal"]["step_ratios"] and all(_finite(r["time"]) for r in data["atal"]["step_ratios"])
    (smoke,) = data["smoke"]
    assert smoke["status"] == "ok", smoke
    assert smoke["resumed_at"] == 3 and smoke["exported"]
    assert smoke["checkpoints"] == ["checkpoint-3", "checkpoint-4"]


def test_optimizer_names_build_their_optimizers():
    params = [torch.nn.Parameter(torch.randn(4, 4))]
    assert type(build_optimizer("adamw", params, lr=1e-3)) is torch.optim.AdamW
    fused = build_optimizer("adamw_fused", params, lr=1e-3)
    assert fused.defaults["fused"] is True
    with pytest.raises(ValueError, match="choose one of"):
        build_optimizer("sgd", params, lr=1e-3)
    with pytest.raises(ValueError, match="choose one of"):
        check_optimizer("sgd")
    for name, package in (("adamw8bit_bnb", "bitsandbytes"), ("adamw8bit_torchao", "torchao")):
        if importlib.util.find_spec(package) is None:
            with pytest.raises(ValueError, match=f"pip install {package}"):
                check_optimizer(name)
            with pytest.raises(ValueError, match=f"pip install {package}"):
                build_optimizer(name, params, lr=1e-3)
        elif name == "adamw8bit_bnb":
            assert "8bit" in type(build_optimizer(name, params, lr=1e-3)).__name__
    assert set(OPTIMIZERS) == {"adamw", "adamw_fused", "adamw8bit_bnb", "adamw8bit_torchao"}


def test_torchao_is_refused_next_to_a_diffusers_it_breaks():
    diffusers = tuple(int(p) for p in importlib.metadata.version("diffusers").split(".")[:2])
    if importlib.util.find_spec("torchao") is None:
        pytest.skip("torchao not installed: the missing-package error is tested above")
    if diffusers < (0, 37):
        with pytest.raises(ValueError, match="diffusers >= 0.37"):
            check_optimizer("adamw8bit_torchao")
    else:
        check_optimizer("adamw8bit_torchao")


def test_trainer_optimizer_flag(tmp_path):
    args = train.parse_args(["--preset", "tiny-sd15", "--optimizer", "adamw_fused"])
    assert args.optimizer == "adamw_fused"
    with pytest.raises(ValueError, match="conflicts with --optimizer"):
        train.parse_args(["--preset", "tiny-sd15", "--use_8bit_adam", "--optimizer", "adamw8bit_torchao"])
    if importlib.util.find_spec("torchao") is None:
        with pytest.raises(ValueError, match="pip install torchao"):
            train.parse_args(["--preset", "tiny-sd15", "--optimizer", "adamw8bit_torchao"])
    result = train.main(["--preset", "tiny-sd15", "--output_dir", str(tmp_path / "run"), "--max_train_steps", "1",
                         "--optimizer", "adamw_fused", "--train_batch_size", "1", "--report_to", "none",
                         "--validation_steps", "0"])
    assert result.global_step == 1 and result.export_path.is_file()


@pytest.mark.parametrize("family, unet_params", [("sd15", 859_520_964), ("sdxl", 2_567_463_684)])
def test_full_size_components_have_the_real_sizes(tmp_path, family, unet_params):
    """What the GPU run builds, checked on the meta device (no memory): the published UNet sizes, the SD VAE, the
    text encoders' widths and SDXL's 2816-wide added conditioning, so the GPU minutes measure the real models."""
    from bench.gpu_train import full_size_base

    base = full_size_base(family, "meta", tmp_path)
    assert sum(p.numel() for p in base.unet.parameters()) == unet_params
    assert list(base.vae.config.block_out_channels) == [128, 256, 512, 512]
    assert base.text_encoder.config.hidden_size == 768 and base.text_encoder.config.num_hidden_layers == 12
    if family == "sdxl":
        assert base.text_encoder_2.config.hidden_size == 1280 and base.text_encoder_2.config.num_hidden_layers == 32
        widths = base.text_encoder.config.hidden_size + base.text_encoder_2.config.hidden_size
        assert widths == base.unet.config.cross_attention_dim
        assert base.text_encoder_2.config.projection_dim + 6 * 256 == \
            base.unet.config.projection_class_embeddings_input_dim
        assert base.vae.config.force_upcast


def _tensor_dtypes(value: object) -> set[torch.dtype]:
    """dtypes of every tensor nested in dicts, lists and tuples (bitsandbytes nests its packed state)."""
    if torch.is_tensor(value):
        return {value.dtype}
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return set().union(*(_tensor_dtypes(item) for item in items))


def test_8bit_adamw_trains_checkpoints_and_resumes_on_cpu(tmp_path):
    """bitsandbytes' 8-bit AdamW (the one the GPU run measures; it has a CPU path) through the trainer: its uint8
    moments are in accelerate's checkpoint and come back on resume, so the resumed step equals the uninterrupted
    one."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    common = ["--preset", "tiny-sd15", "--optimizer", "adamw8bit_bnb", "--train_batch_size", "1", "--report_to",
              "none", "--validation_steps", "0", "--learning_rate", "1e-3", "--seed", "5", "--output_dir", str(out),
              "--max_train_steps", "3", "--checkpointing_steps", "2"]
    with torch_threads(1):  # bit-for-bit comparison of two runs (see harness.torch_threads)
        straight = train.main(common)
        saved = torch.load(out / "checkpoint-2" / "optimizer.bin", weights_only=True)
        assert torch.uint8 in _tensor_dtypes(saved["state"])
        resumed = train.main(common + ["--resume_from_checkpoint", "latest"])
    assert resumed.resumed_from == out / "checkpoint-2" and sorted(resumed.losses) == [3]
    assert resumed.losses[3]["l_diff"] == straight.losses[3]["l_diff"]
    a, b = straight.branch.state_dict(), resumed.branch.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
