"""Trainer and node run the same network: a UNet config value that ComfyUI's blocks cannot run (the loader node
rebuilds the branch from them) is refused when a file is loaded and when training starts, by the one check in
`painternet_core.config.check_comfy_supported`, in one line naming the field, its value and what is supported."""
from __future__ import annotations

import json
import re

import pytest
import torch

from painternet_core.checkpoint import load_branch
from painternet_core.config import TINY_SD15_UNET, PainterNetConfig

# A value diffusers builds without complaint but ComfyUI's UNet blocks do not run, for every stored topology field
# that has one (the files' `painternet_config.unet`).
STORED = [
    ("norm_num_groups", 16), ("norm_eps", 1e-6), ("flip_sin_to_cos", False), ("freq_shift", 1),
    ("downsample_padding", 0), ("mid_block_scale_factor", 1.4142), ("upcast_attention", True),
    ("mid_block_type", "UNetMidBlock2D"), ("act_fn", "gelu"), ("center_input_sample", True),
    ("resnet_time_scale_shift", "scale_shift"), ("only_cross_attention", True), ("time_embedding_type", "fourier"),
    ("class_embed_type", "timestep"), ("num_class_embeds", 10), ("encoder_hid_dim", 16),
    ("dual_cross_attention", True),
]
# diffusers options a PainterNet file does not store: only the base UNet the trainer copies can carry them.
UNSTORED = [
    ("conv_in_kernel", 5), ("conv_out_kernel", 1), ("time_embedding_dim", 256), ("time_embedding_act_fn", "silu"),
    ("timestep_post_act", "silu"), ("time_cond_proj_dim", 8), ("resnet_skip_time_act", True),
    ("resnet_out_scale_factor", 2.0), ("attention_type", "gated"), ("mid_block_only_cross_attention", True),
    ("cross_attention_norm", "layer_norm"), ("class_embeddings_concat", True),
]


def _refusal(key: str, value: object) -> str:
    return rf"unet\.{key}={re.escape(repr(value))} is not supported: .* only run {key}="


def _write(path, unet: dict) -> None:
    from safetensors.torch import save_file

    config = json.loads(PainterNetConfig(family="sd15", unet=TINY_SD15_UNET).to_json())
    config["unet"] = unet
    save_file({"conv_in.weight": torch.zeros(32, 9, 3, 3)}, str(path),
              metadata={"painternet_format": "1", "painternet_config": json.dumps(config)})


@pytest.mark.parametrize("key, value", STORED, ids=[k for k, _ in STORED])
def test_a_file_with_a_value_comfyui_cannot_run_is_refused_at_load(tmp_path, key, value):
    from harness.comfy_helpers import pack_module

    path = tmp_path / f"{key}.safetensors"
    _write(path, dict(TINY_SD15_UNET, **{key: value}))
    with pytest.raises(ValueError, match=_refusal(key, value)) as core:
        load_branch(str(path))
    assert "\n" not in str(core.value)
    with pytest.raises(ValueError, match=_refusal(key, value)):
        pack_module("nodes.branch").load_painternet(str(path), "fp32")


@pytest.mark.parametrize("key, value", STORED + UNSTORED, ids=[k for k, _ in STORED + UNSTORED])
def test_a_base_unet_with_a_value_comfyui_cannot_run_is_refused_at_training_start(key, value):
    """What the trainer calls on the base's diffusers config before it copies anything."""
    with pytest.raises(ValueError, match=_refusal(key, value)) as refused:
        PainterNetConfig.from_unet_config(dict(TINY_SD15_UNET, **{key: value}))
    assert "\n" not in str(refused.value)


def test_heads_without_one_count_or_one_size_are_refused_at_both_ends(tmp_path):
    heads = dict(TINY_SD15_UNET, attention_head_dim=[2, 4, 4, 8])  # head sizes 16, 8, 16, 8
    with pytest.raises(ValueError, match=r"attention heads \[2, 4, 4, 8\] .* one head size"):
        PainterNetConfig.from_unet_config(heads)
    # Malformed head lists are left to the type checks that follow: a ValueError, never a TypeError.
    with pytest.raises(ValueError, match="attention_head_dim"):
        PainterNetConfig.from_unet_config(dict(TINY_SD15_UNET, attention_head_dim=[[]] * 4))
    _write(tmp_path / "heads.safetensors", heads)
    with pytest.raises(ValueError, match=r"attention heads \[2, 4, 4, 8\] .* one head size"):
        load_branch(str(tmp_path / "heads.safetensors"))


def test_the_refusals_are_whole_one_line_messages():
    """What a training engineer reads: the field, its value, every value ComfyUI runs (as JSON), what that means and
    the fix; the same for head lists."""
    with pytest.raises(ValueError, match=r"^unet\.upcast_attention=True is not supported: ComfyUI's UNet blocks, from "
                                         r"which the PainterNet node rebuilds the branch, only run "
                                         r"upcast_attention=false or null \(attention in the compute dtype, no "
                                         r"per-model upcast\); train from an SD1\.5- or SDXL-style UNet that uses it$"):
        PainterNetConfig.from_unet_config(dict(TINY_SD15_UNET, upcast_attention=True))
    with pytest.raises(ValueError, match=r"^unet attention heads \[2, 4, 4, 8\] over block_out_channels "
                                         r"\[32, 32, 64, 64\] are not supported: ComfyUI's UNet blocks, from which the "
                                         r"PainterNet node rebuilds the branch, need one head count for every block "
                                         r"or one head size \(channels / heads\) for every block$"):
        PainterNetConfig.from_unet_config(dict(TINY_SD15_UNET, attention_head_dim=8, num_attention_heads=[2, 4, 4, 8]))
    for heads in ([1, 2, 2, 4], [4, 4, 4, 8]):  # a head count of 1; only two different counts
        with pytest.raises(ValueError, match=rf"^unet attention heads {re.escape(str(heads))} over "):
            PainterNetConfig.from_unet_config(dict(TINY_SD15_UNET, attention_head_dim=heads))
    for key, value in (("freq_shift", False), ("mid_block_scale_factor", True), ("flip_sin_to_cos", 1)):
        with pytest.raises(ValueError, match=_refusal(key, value)):  # True is not 1 here, nor 0 False
            PainterNetConfig.from_unet_config(dict(TINY_SD15_UNET, **{key: value}))


def test_one_head_count_or_one_head_size_is_accepted_and_bad_head_lists_get_the_type_checks():
    for heads in ([8, 8, 8, 8], [1, 1, 2, 2], (2, 2, 4, 4)):
        assert PainterNetConfig.from_unet_config(dict(TINY_SD15_UNET, attention_head_dim=heads)).unet[
            "attention_head_dim"] == list(heads)
    for heads, message in (
            ([0, 4, 4, 8], r"attention_head_dim\[0\]=0 must be an integer in \[1, 256\]; the file is damaged or not a "
                           r"supported SD1\.5/SDXL branch"),
            ([True, 4, 4, 8], r"attention_head_dim\[0\]=True must be an integer in \[1, 256\]; the file is damaged or "
                              r"not a supported SD1\.5/SDXL branch"),
            ([2, 4, 4], r"attention_head_dim has 3 entries, expected 4 \(one per block\): \[2, 4, 4\]; the file is "
                        r"damaged")):
        with pytest.raises(ValueError, match=rf"^painternet_config unet\.{message}$"):
            PainterNetConfig.from_unet_config(dict(TINY_SD15_UNET, attention_head_dim=heads))


def test_stock_values_are_accepted():
    explicit = dict(TINY_SD15_UNET, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
                    downsample_padding=1, mid_block_scale_factor=1.0, upcast_attention=False, conv_in_kernel=3,
                    resnet_out_scale_factor=1.0, attention_type="default", mid_block_only_cross_attention=None)
    assert PainterNetConfig.from_unet_config(explicit).unet["mid_block_scale_factor"] == 1.0


@pytest.mark.parametrize("key, value", [("norm_num_groups", 16), ("upcast_attention", True)])
def test_the_trainer_refuses_such_a_base_before_training(tmp_path, key, value):
    """The real entry point: `train.main` on a saved diffusers pipeline whose UNet config carries the value (the
    weights fit either way) stops before the first step, with the one-line refusal."""
    from training.trainer import train
    from training.trainer.presets import save_tiny_pipeline

    pipeline = save_tiny_pipeline(tmp_path / "base", "sd15")
    config_path = pipeline / "unet" / "config.json"
    config_path.write_text(json.dumps(dict(json.loads(config_path.read_text()), **{key: value})))
    with pytest.raises(ValueError, match=_refusal(key, value)):
        train.main(["--pretrained_model_name_or_path", str(pipeline), "--output_dir", str(tmp_path / "out"),
                    "--train_data", str(tmp_path), "--max_train_steps", "1", "--train_batch_size", "1",
                    "--report_to", "none",
                    "--validation_steps", "0"])
    assert not (tmp_path / "out" / "painternet.safetensors").exists()
