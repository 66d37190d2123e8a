"""The trainer end to end on the tiny CPU presets (DESIGN §7): identity at step 0, a short run that learns only the
branch, exact resume, crash-safe checkpoints under SIGKILL, an SDXL smoke run and export parity."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import torch_threads
from painternet_core.branch import PainterNetBranch, painternet_unet_forward
from painternet_core.checkpoint import load_branch
from training.inference import BaseModel, load_base_model
from training.trainer import train
from training.trainer.checkpoints import KILL_DURING_SAVE_ENV, list_checkpoints
from training.trainer.data import SyntheticShapes, collate_samples
from training.trainer.step import compute_loss, step_generator

REPO = Path(__file__).resolve().parent.parent
FAST = ["--train_batch_size", "1", "--report_to", "none", "--validation_steps", "0", "--seed", "3"]


@pytest.fixture(scope="module")
def sd15_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, train.TrainResult]:
    """One 3-step tiny-sd15 run with a checkpoint at 2, ATAL on, validation and tensorboard at step 3; on one thread,
    so the resume test can compare its weights bit for bit (see ``harness.torch_threads``)."""
    out = tmp_path_factory.mktemp("sd15") / "run"
    with torch_threads(1):
        result = train.main(["--preset", "tiny-sd15", "--output_dir", str(out), "--max_train_steps", "3",
                             "--checkpointing_steps", "2", "--train_batch_size", "1", "--seed", "3",
                             "--learning_rate", "1e-3", "--validation_steps", "3", "--validation_inference_steps", "2",
                             "--report_to", "tensorboard"])
    return out, result


def _batch(resolution: int = 64, size: int = 2) -> dict:
    stream = iter(SyntheticShapes(8, resolution, seed=1))
    return collate_samples([next(stream) for _ in range(size)])


def test_step0_of_a_fresh_branch_reproduces_the_base_prediction(sd15_run):
    _, result = sd15_run
    base = result.base
    branch = PainterNetBranch.from_unet(base.unet)
    batch = _batch()
    got = compute_loss(base, branch, batch, step_generator(0, 0, 0, torch.device("cpu")), config=branch.config,
                       weight_dtype=torch.float32, recorder=None, beta=0.0, prompt_dropout=0.0).prediction
    # The same draws, through the base UNet alone.
    from training.inference import encode_prompts, vae_encoder

    generator = step_generator(0, 0, 0, torch.device("cpu"))
    dropped = torch.rand(2, generator=generator) < 0.0
    text = encode_prompts(base, batch["prompt"], dropped, torch.device("cpu"), torch.float32, batch)
    with torch.no_grad():
        latents = vae_encoder(base.vae, True, generator)((batch["pixel_values"] + 1) / 2)
        vae_encoder(base.vae, True, generator)((batch["pixel_values"] + 1) / 2)  # the condition's draw
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, 1000, (2,), generator=generator)
        noisy = base.noise_scheduler.add_noise(latents, noise, t)
        expected = base.unet(noisy, t, encoder_hidden_states=text.hidden_states).sample
    assert torch.equal(got, expected)


def test_the_trainer_step_runs_no_node_input_checks_and_backward_outside_autocast(sd15_run):
    """The node's untrusted-input checks (finite pixels and mask, a non-empty hole) each read a value back from the
    device; the trainer's step leaves its data to the data pipeline, so a batch with an empty hole is trained on here
    while the node's path refuses it. The backward pass runs with autocast off, as torch.amp asks."""
    from painternet_core.conditioning import prepare_condition

    _, result = sd15_run
    base = result.base
    branch = PainterNetBranch.from_unet(base.unet)
    batch = _batch()
    batch["mask"] = torch.zeros_like(batch["mask"])
    autocast_in_backward = []

    def backward(loss: torch.Tensor) -> None:
        autocast_in_backward.append(torch.is_autocast_enabled("cpu"))
        loss.backward()

    out = compute_loss(base, branch, batch, step_generator(0, 0, 0, torch.device("cpu")), config=branch.config,
                       weight_dtype=torch.float32, recorder=None, beta=0.0, prompt_dropout=0.0, backward=backward,
                       autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert torch.isfinite(out.loss) and autocast_in_backward == [False]
    assert any(p.grad is not None for p in branch.parameters())
    with pytest.raises(ValueError, match="mask is empty"):
        prepare_condition((batch["pixel_values"] + 1) / 2, batch["mask"], lambda px: px, branch.config)


def test_samples_on_a_fallback_scene_caption_get_no_atal(sd15_run):
    """--caption_fallback global trains an object without a local caption on the scene caption, but with ATAL off
    for that sample: its L_ATAL is exactly the one of the batch without it."""
    from painternet_core.atal import ATALRecorder, install_atal_processors

    _, result = sd15_run
    base = result.base
    branch = PainterNetBranch.from_unet(base.unet)
    recorder = ATALRecorder()
    install_atal_processors(branch, recorder)
    batch = _batch()

    def l_atal(atal: list[bool]) -> float:
        out = compute_loss(base, branch, {**batch, "atal": torch.tensor(atal)}, step_generator(0, 0, 0,
                           torch.device("cpu")), config=branch.config, weight_dtype=torch.float32,
                           recorder=recorder, beta=1e-5, prompt_dropout=0.0)
        return float(out.l_atal)

    both, first, none = l_atal([True, True]), l_atal([True, False]), l_atal([False, False])
    assert both > 0 and first > 0 and none == 0.0
    assert first != both


def test_tiny_sd15_run_trains_only_the_branch(sd15_run):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    out, result = sd15_run
    assert result.global_step == 3 and sorted(result.losses) == [1, 2, 3]
    for logs in result.losses.values():
        assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
        assert logs["l_atal_weighted"] == pytest.approx(1e-5 * logs["l_atal"])
    assert any(logs["l_atal"] > 0 for logs in result.losses.values())  # 0 only when the prompt was dropped
    fresh = PainterNetBranch.from_unet(UNet2DConditionModel.from_pretrained(out / "tiny-base", subfolder="unet"))
    trained = result.branch.state_dict()
    changed = [k for k, v in fresh.state_dict().items() if not torch.equal(v, trained[k])]
    assert any(k.startswith("attention_control") for k in changed)
    assert any(k.startswith("layer_control") for k in changed)
    assert any(k.startswith("down_blocks") for k in changed)
    for cls, sub, live in ((UNet2DConditionModel, "unet", result.base.unet), (AutoencoderKL, "vae", result.base.vae),
                           (CLIPTextModel, "text_encoder", result.base.text_encoder)):
        disk = cls.from_pretrained(out / "tiny-base", subfolder=sub).state_dict()
        live_state = live.state_dict()
        assert all(torch.equal(disk[k], live_state[k]) for k in disk), sub
        assert not any(p.requires_grad for p in live.parameters())
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert (out / "checkpoint-2" / "model.safetensors").is_file()
    assert (out / "validation" / "step-0000003.png").is_file()
    assert any((out / "logs").rglob("events.out.tfevents.*"))


def test_every_checkpoint_holds_a_comfyui_loadable_branch_of_its_step(sd15_run):
    """checkpoint-N/painternet.safetensors is the PainterNet-format branch at step N (what PainterNetLoader reads),
    written inside the checkpoint folder before its atomic rename, equal to the trainer state saved next to it."""
    from safetensors.torch import load_file

    out, _ = sd15_run
    state, config = load_branch(str(out / "checkpoint-2" / "painternet.safetensors"))
    saved = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    assert config.family == "sd15" and set(state) == set(saved)
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    final, _ = load_branch(str(out / "painternet.safetensors"))
    assert any(not torch.equal(final[k], state[k]) for k in state)  # step 3 moved on from step 2


def test_total_limit_keeps_the_newest_complete_checkpoints(tmp_path):
    from accelerate import Accelerator

    from training.trainer.checkpoints import save_checkpoint

    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))
    for step in range(1, 5):
        save_checkpoint(accelerator, tmp_path, step, 2, lambda folder: (folder / "extra.txt").write_text(str(step)))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
    assert (tmp_path / "checkpoint-4" / "extra.txt").read_text() == "4"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_resume_latest_continues_with_the_same_next_batch_loss(sd15_run, tmp_path, monkeypatch):
    out, straight = sd15_run
    copy = tmp_path / "run"
    # the run's final export and logs are left out; checkpoint-2 is copied whole (a missing file would make it damaged)
    shutil.copytree(out, copy, ignore=lambda folder, names: [n for n in names if Path(folder) == out
                                                             and n in ("validation", "logs", "painternet.safetensors")])
    builds = [0]
    build = SyntheticShapes._build

    def counting_build(self, record, rng):
        builds[0] += 1
        return build(self, record, rng)

    monkeypatch.setattr(SyntheticShapes, "_build", counting_build)
    with torch_threads(1):
        resumed = train.main(["--preset", "tiny-sd15", "--output_dir", str(copy), "--max_train_steps", "3",
                              "--checkpointing_steps", "2", "--learning_rate", "1e-3", "--resume_from_checkpoint",
                              "latest", *FAST])
    monkeypatch.undo()
    assert resumed.resumed_from == copy / "checkpoint-2"
    assert sorted(resumed.losses) == [3]
    # resumed by position: only the samples waiting in the shuffle buffer were rebuilt, never the consumed ones (the
    # 256 synthetic records were all read into the 256-sample buffer before the first yield; 2 have been consumed)
    position = json.loads((copy / "checkpoint-2" / "data_state_0.json").read_text())["positions"]["0"]
    assert position["consumed"] == 256 and len(position["buffer"]) == 254 and builds == [254]
    assert resumed.losses[3]["l_diff"] == straight.losses[3]["l_diff"]
    assert resumed.losses[3]["l_atal"] == straight.losses[3]["l_atal"]
    a, b = straight.branch.state_dict(), resumed.branch.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("point", ["state", "rename"])
def test_sigkill_during_a_save_leaves_the_previous_checkpoint_resumable(sd15_run, tmp_path, point):
    """The run SIGKILLs itself at a named point of checkpoint-2's save (the trainer's fault-injection hook: a kill
    at a known point, not a race with the save): checkpoint-1 stays the newest complete checkpoint, the half-written
    one is never taken for a checkpoint, and a resume continues from checkpoint-1 and clears the leftover."""
    out, _ = sd15_run
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(out / "tiny-base", run / "tiny-base")
    cmd = [sys.executable, str(REPO / "training" / "trainer" / "train.py"), "--preset", "tiny-sd15", "--output_dir", str(run),
           "--max_train_steps", "3", "--checkpointing_steps", "1", *FAST]
    env = dict(os.environ, **{KILL_DURING_SAVE_ENV: f"2:{point}"})
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode(errors="replace")[-3000:]
    assert (run / ".checkpoint-2.tmp").is_dir(), "the kill did not land inside checkpoint-2's save"
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-1"]
    resumed = train.main(["--preset", "tiny-sd15", "--output_dir", str(run), "--max_train_steps", "2",
                          "--checkpointing_steps", "100", "--resume_from_checkpoint", "latest", *FAST])
    assert resumed.resumed_from == run / "checkpoint-1" and sorted(resumed.losses) == [2]
    assert not [p for p in os.listdir(run) if p.endswith(".tmp")]


def test_tiny_sdxl_smoke_with_accumulation_and_checkpointing(tmp_path):
    result = train.main(["--preset", "tiny-sdxl", "--output_dir", str(tmp_path), "--max_train_steps", "1",
                         "--gradient_accumulation_steps", "2", "--gradient_checkpointing", "--checkpointing_steps",
                         "1", "--train_batch_size", "1", "--prompt_dropout", "0.5", "--validation_steps", "1",
                         "--validation_inference_steps", "2", "--report_to", "none"])
    assert result.global_step == 1 and torch.isfinite(torch.tensor(result.losses[1]["loss"]))
    assert result.base.vae.dtype == torch.float32
    state, config = load_branch(str(result.export_path))
    acp_weights = sum(k.startswith("attention_control") and k.endswith("weight") for k in state)
    assert config.family == "sdxl" and len(config.layout.attention) == acp_weights
    assert (tmp_path / "validation" / "step-0000001.png").is_file()


def test_export_loads_and_matches_the_trainers_model(sd15_run):
    out, result = sd15_run
    state, config = load_branch(str(out / "painternet.safetensors"))
    loaded = PainterNetBranch(config)
    loaded.load_state_dict(state, strict=True)
    base: BaseModel = result.base
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    condition = torch.randn(2, 5, 8, 8, generator=generator)
    context = torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        ours = painternet_unet_forward(base.unet, result.branch, sample, 500, context, condition)
        theirs = painternet_unet_forward(base.unet, loaded, sample, 500, context, condition)
        plain = base.unet(sample, 500, encoder_hidden_states=context).sample
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, plain)  # the trained branch really contributes


def test_cli_help_yaml_config_and_bad_values(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    help_text = capsys.readouterr().out
    for flag in ("--pretrained_model_name_or_path", "--resume_from_checkpoint", "--beta", "--no_atal", "--preset",
                 "--use_8bit_adam", "--export_name", "--checkpoints_total_limit", "--caption_fallback"):
        assert flag in help_text
    config = tmp_path / "c.yaml"
    config.write_text("preset: tiny-sd15\nlearning_rate: 0.002\nmax_train_steps: 7\n")
    args = train.parse_args(["--config", str(config), "--max_train_steps", "9"])
    assert (args.learning_rate, args.max_train_steps, args.preset) == (0.002, 9, "tiny-sd15")
    config.write_text("learning_rat: 1\n")
    with pytest.raises(ValueError, match="learning_rat"):
        train.parse_args(["--config", str(config)])
    with pytest.raises(ValueError, match="prompt_dropout"):
        train.parse_args(["--preset", "tiny-sd15", "--prompt_dropout", "1.5"])
    with pytest.raises(ValueError, match="exactly one"):
        train.parse_args([])


def test_export_runs_in_comfyui_like_in_the_trainer(sd15_run, tmp_path):
    """The exported file through the PainterNetLoader node on a ComfyUI model holding the trainer's base UNet gives
    the trainer's prediction (ComfyUI is fed the same discrete timestep and context)."""
    import shutil

    import comfy.model_management as mm
    import folder_paths

    from harness.comfy_helpers import comfy_model_from_diffusers, load_pack, pack_module, sampling_options

    out, result = sd15_run
    folder = tmp_path / "painternet"
    folder.mkdir()
    shutil.copy(out / "painternet.safetensors", folder / "trained-tiny.safetensors")
    folder_paths.add_model_folder_path("painternet", str(folder))
    (painternet,) = load_pack()["PainterNetLoader"].execute("trained-tiny.safetensors", "fp32")
    unet = result.base.unet.float()
    model = comfy_model_from_diffusers(unet, "sd15")
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    condition = torch.randn(1, 5, 8, 8, generator=generator)
    context = torch.randn(1, 77, 32, generator=generator)
    t = torch.tensor([500.0])
    with torch.no_grad():
        want = painternet_unet_forward(unet, result.branch.float(), sample, t, context, condition)
    patched = pack_module("nodes.injection").apply_painternet(model, painternet, condition, 1.0, 0.0, 1.0)
    mm.load_models_gpu([patched] + patched.get_nested_additional_models())
    with torch.no_grad():
        got = patched.model.diffusion_model(sample, t, context=context,
                                            transformer_options=sampling_options(patched, 1.0, [0]))
    # Relative to the prediction's scale: the branch trained on one thread (the fixture) gave 3.3e-5 on outputs up to
    # ~0.6 (5e-5 of the scale), the same branch trained on two threads under 1e-5; a wrong or missing residual moves
    # the prediction by 1e-2 and more.
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_export_rebuilt_by_comfyui_gives_the_trained_branchs_residuals(sd15_run):
    """The tiny preset's export, rebuilt from ComfyUI's blocks by the loader node, gives every residual of the branch
    the trainer trained (the diffusers reference) on the same input: the node runs the network that was trained."""
    from harness.comfy_helpers import pack_module

    out, result = sd15_run
    painternet = pack_module("nodes.branch").load_painternet(str(out / "painternet.safetensors"), "fp32")
    generator = torch.Generator().manual_seed(2)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    condition = torch.randn(2, 5, 8, 8, generator=generator)
    context = torch.randn(2, 77, 32, generator=generator)
    t = torch.tensor([999.0, 10.0])
    with torch.no_grad():
        want = result.branch.float()(sample, t, context, condition, None)
        got = painternet.patcher.model(torch.cat([sample, condition], 1), t, context)
    pairs = list(zip(want.down + [want.mid] + want.up + want.attention,
                     got["down"] + [got["mid"]] + got["up"] + list(got["attention"].values())))
    assert len(pairs) == 12 + 1 + 15 + 16
    for reference, node in pairs:
        assert reference.abs().max() > 1e-3  # trained control points: not a comparison of zeros
        assert (reference - node).abs().max() <= 1e-5


@pytest.mark.slow
def test_two_process_ddp_run_keeps_the_lr_schedule_and_saves_every_rank(tmp_path):
    """`torchrun --nproc_per_node 2 training/trainer/train.py` (gloo on CPU): the script runs unchanged in data parallel, the
    prepared scheduler (stepped once per process) follows the single-process schedule, every rank saves its RNG
    state into the shared checkpoint, and the main process exports a loadable branch."""
    out = tmp_path / "ddp"
    log = tmp_path / "ddp.log"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # --standalone: torchrun picks a free port for its own rendezvous (no port race with other jobs).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "training" / "trainer" / "train.py"), "--preset", "tiny-sd15",
           "--output_dir", str(out), "--max_train_steps", "4", "--checkpointing_steps", "3",
           "--lr_scheduler", "linear", "--lr_warmup_steps", "2", "--learning_rate", "1e-3", *FAST]
    with open(log, "wb") as sink:  # a file, not a pipe: two chatty ranks must never block on a full pipe
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:  # the launcher and both ranks, not just the launcher
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = log.read_text(errors="replace")
    assert code == 0, text[-4000:]
    assert "MULTI_CPU" in text and "Num processes: 2" in text
    checkpoint = out / "checkpoint-3"
    assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    # every rank's data position (its own slot), and the branch at step 3 in the ComfyUI format
    for rank in (0, 1):
        state = json.loads((checkpoint / f"data_state_{rank}.json").read_text())
        assert state["micro_batches"] == 3 and list(state["positions"]) == [str(rank)]
    assert load_branch(str(checkpoint / "painternet.safetensors"))[1].family == "sd15"
    scheduler = torch.load(checkpoint / "scheduler.bin", weights_only=True)
    # Linear warm-up 2, decay to 0 at step 4: after 3 optimizer steps the factor is 0.5 on every process count;
    # the prepared scheduler stepped once per process per optimizer step (3 x 2).
    assert scheduler["_last_lr"][0] == pytest.approx(0.5e-3) and scheduler["last_epoch"] == 6
    state, config = load_branch(str(out / "painternet.safetensors"))
    assert config.family == "sd15" and all(torch.isfinite(v).all() for v in state.values())


def test_single_file_checkpoint_loads_the_same_weights_as_its_diffusers_folder(sd15_run, tmp_path, monkeypatch):
    """`--pretrained_model_name_or_path model.safetensors --single_file_config FOLDER`: an original-layout SD1.5 file
    (model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.*, written here with ComfyUI's own key
    maps) loads offline with exactly the folder's weights; without a config the error names the fix."""
    import comfy.diffusers_convert
    from safetensors.torch import save_file

    from harness.comfy_helpers import comfy_unet_key_map

    out, _ = sd15_run
    folder = out / "tiny-base"
    base = load_base_model(folder)
    unet_keys = comfy_unet_key_map(base.unet, "sd15")
    vae = comfy.diffusers_convert.convert_vae_state_dict(base.vae.state_dict())
    state = {f"model.diffusion_model.{unet_keys[k]}": v for k, v in base.unet.state_dict().items()}
    state |= {f"first_stage_model.{k}": v for k, v in vae.items()}
    state |= {f"cond_stage_model.transformer.{k}": v for k, v in base.text_encoder.state_dict().items()}
    single = tmp_path / "tiny-sd15.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(single))

    loaded = load_base_model(single, str(folder))
    assert loaded.family == "sd15"
    for part in ("unet", "vae", "text_encoder"):
        want, got = getattr(base, part).state_dict(), getattr(loaded, part).state_dict()
        assert set(want) == set(got), part
        assert all(torch.equal(want[k], got[k].reshape(want[k].shape)) for k in want), part
    import huggingface_hub.constants

    # An empty Hugging Face cache, as on a fresh machine: a cached SD1.5 config must not change the outcome.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(ValueError, match="--single_file_config"):
        load_base_model(single)
    pickled = tmp_path / "tiny-sd15.ckpt"
    pickled.write_bytes(b"not loaded")
    with pytest.raises(ValueError, match=r"\.ckpt file"):
        load_base_model(pickled)


def test_documented_training_path_runs_the_trainer_cli():
    """`python training/train.py` (the path the README and launch configs use) is the trainer's own command line:
    the same flags, and a bad value is the same clean exit 2."""
    script = os.path.join(REPO, "training", "train.py")
    shown = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "--pretrained_model_name_or_path" in shown.stdout and "--caption_fallback" in shown.stdout
    bad = subprocess.run([sys.executable, script, "--preset", "tiny-sd15", "--max_train_steps", "0"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2, bad.stderr[-2000:]
