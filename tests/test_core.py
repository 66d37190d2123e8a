"""Tier 1: config, control layout, checkpoint format and condition preparation (room boundaries: test_rooms.py)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import struct

import pytest
import torch

from painternet_core.branch import PainterNetBranch
from painternet_core.checkpoint import load_branch, read_header, save_branch
from painternet_core.conditioning import latent_mask, normalize_mask, prepare_condition
from painternet_core.config import (SD15_UNET, SDXL_UNET, TINY_SD15_UNET, TINY_SDXL_UNET, PainterNetConfig,
                                    control_layout)


@pytest.mark.parametrize("unet,counts", [(SD15_UNET, (12, 15, 16)), (SDXL_UNET, (9, 11, 70))], ids=["sd15", "sdxl"])
def test_control_layout_matches_the_design_counts(unet, counts):
    layout = control_layout(unet, with_attention=True)
    assert (len(layout.down), len(layout.up), len(layout.attention)) == counts
    assert control_layout(unet, with_attention=False).attention == ()


def test_control_layout_is_every_control_point_channel_in_injection_order():
    """DESIGN §3 spelled out for the real bases: conv_in, each down layer then its downsampler, the mid block, each
    up layer (one more than down) then its upsampler; ACPs per cross-attention transformer, down, mid, then up."""
    sd15 = control_layout(SD15_UNET, with_attention=True)
    assert sd15.down == (320,) + (320,) * 3 + (640,) * 3 + (1280,) * 3 + (1280,) * 2
    assert (sd15.mid, sd15.up) == (1280, (1280,) * 4 + (1280,) * 4 + (640,) * 4 + (320,) * 3)
    assert sd15.attention == (320,) * 2 + (640,) * 2 + (1280,) * 2 + (1280,) + (1280,) * 3 + (640,) * 3 + (320,) * 3
    sdxl = control_layout(SDXL_UNET, with_attention=True)  # depths 1, 2, 10; the first block has no attention
    assert sdxl.down == (320,) * 4 + (640,) * 3 + (1280,) * 2
    assert (sdxl.mid, sdxl.up) == (1280, (1280,) * 4 + (640,) * 4 + (320,) * 3)
    assert sdxl.attention == (640,) * 2 * 2 + (1280,) * 2 * 10 + (1280,) * 10 + (1280,) * 3 * 10 + (640,) * 3 * 2
    assert control_layout(SDXL_UNET, with_attention=False) == dataclasses.replace(sdxl, attention=())


def test_control_layout_of_per_block_layer_counts_mirrors_them_on_the_way_up():
    """diffusers allows one layers_per_block per block; each up block has its mirrored down block's count plus one."""
    unet = dict(TINY_SD15_UNET, layers_per_block=[1, 2, 3, 1])
    PainterNetConfig(family="sd15", unet=unet)
    layout = control_layout(unet, with_attention=True)
    assert layout.down == (32,) * 6 + (64,) * 5
    assert layout.up == (64,) * 2 + (64,) + (64,) * 4 + (64,) + (32,) * 3 + (32,) + (32,) * 2
    assert layout.attention == (32,) * 3 + (64,) * 3 + (64,) + (64,) * 4 + (32,) * 3 + (32,) * 2


def test_a_topology_without_the_keys_diffusers_defaults_is_accepted_with_those_defaults():
    """A stored topology may omit what diffusers defaults (GroupNorm 32, depth 1, the cross-attention mid block, ...):
    it validates and lays out as if they were written, and the channels still have to fit 32 groups."""
    from painternet_core.config import validate_unet

    defaulted = ("norm_num_groups", "transformer_layers_per_block", "mid_block_type", "norm_eps", "freq_shift",
                 "flip_sin_to_cos", "in_channels", "out_channels", "act_fn", "use_linear_projection")
    bare = {k: v for k, v in TINY_SD15_UNET.items() if k not in defaulted}
    assert set(TINY_SD15_UNET) - set(bare) == set(defaulted)
    validate_unet(bare)
    assert control_layout(bare, with_attention=True) == control_layout(TINY_SD15_UNET, with_attention=True)
    with pytest.raises(ValueError, match=r"^painternet_config unet\.block_out_channels=\[48, 48, 96, 96\]: entry 0 "
                                         r"\(48\) must be a multiple of norm_num_groups \(32\) and of the first "
                                         r"entry; the file is damaged$"):
        validate_unet(dict(bare, block_out_channels=[48, 48, 96, 96]))


def test_validate_unet_refusals_are_whole_messages():
    from painternet_core.config import validate_unet

    cases = [
        (dict(TINY_SD15_UNET, sample_size=64, _class_name="UNet2DConditionModel"),
         r"unet has unknown keys \['_class_name', 'sample_size'\]; the file was written by a newer PainterNet \(update "
         r"the pack\) or is damaged"),
        ({k: v for k, v in TINY_SD15_UNET.items() if k != "up_block_types"},
         r"unet has no 'up_block_types'; the file is damaged"),
        ({k: v for k, v in TINY_SD15_UNET.items() if k != "attention_head_dim"},
         r"unet has neither attention_head_dim nor num_attention_heads; the file is damaged"),
        (dict(TINY_SD15_UNET, use_linear_projection="yes"), r"unet\.use_linear_projection='yes' must be true or false"),
        (dict(TINY_SD15_UNET, norm_num_groups=16),
         r"unet\.norm_num_groups=16 is not supported: ComfyUI's UNet blocks, from which the PainterNet node rebuilds "
         r"the branch, only run norm_num_groups=32 \(GroupNorm\(32\) in every resnet and transformer\); train from an "
         r"SD1\.5- or SDXL-style UNet that uses it"),
    ]
    for unet, message in cases:
        with pytest.raises(ValueError, match=f"^painternet_config {message}$"):
            validate_unet(unet)
    validate_unet(dict(TINY_SD15_UNET, use_linear_projection=None, upcast_attention=None))


def test_config_json_round_trip_and_errors():
    config = PainterNetConfig.from_unet_config(TINY_SD15_UNET)
    assert PainterNetConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="newer PainterNet"):
        PainterNetConfig.from_json(json.dumps(dict(json.loads(config.to_json()), future_field=1)))
    with pytest.raises(ValueError, match="does not match the UNet topology"):
        PainterNetConfig(family="sdxl", unet=TINY_SD15_UNET)
    with pytest.raises(ValueError, match="needs cross_attention=True"):
        PainterNetConfig(family="sd15", unet=TINY_SD15_UNET, cross_attention=False)


def test_config_from_a_diffusers_config_stores_lists_of_the_topology_and_the_base_in_channels():
    """`UNet2DConditionModel.config` holds tuples and keys that do not fix the weights; the stored topology is the
    JSON-safe topology subset with the base's 4 input channels, whatever the copied UNet had (an inpainting base: 9)."""
    diffusers_config = {**{k: tuple(v) if isinstance(v, list) else v for k, v in TINY_SD15_UNET.items()},
                        "in_channels": 9, "sample_size": 64, "_class_name": "UNet2DConditionModel"}
    config = PainterNetConfig.from_unet_config(diffusers_config)
    assert config.unet == dict(TINY_SD15_UNET, in_channels=4)
    assert config.branch_unet_config["in_channels"] == 9
    assert PainterNetConfig.from_json(config.to_json()) == config


def test_config_json_is_sorted_so_one_config_has_one_text():
    """Equal configs write the same metadata text, so exporting the same branch twice gives identical files."""
    config = PainterNetConfig.from_unet_config(TINY_SD15_UNET, mask_resize="nearest")
    text = config.to_json()
    reordered = PainterNetConfig(**dict(reversed(list(json.loads(text).items())))
                                 | {"unet": dict(reversed(list(config.unet.items())))})
    assert reordered == config and reordered.to_json() == text
    data = json.loads(text)
    assert list(data) == sorted(data) and list(data["unet"]) == sorted(data["unet"])
    assert PainterNetConfig.from_json(text).to_json() == text


@pytest.mark.parametrize("addition, klass", [("image", None), (None, "timestep"), ("text_image", "projection")])
def test_infer_family_refuses_other_conditioning_naming_both_fields(addition, klass):
    """What the trainer's inference helper calls on a pipeline's UNet: only "text_time" (SDXL) or neither embedding
    (SD1.5) is a family; anything else names both fields instead of guessing SD1.5."""
    from painternet_core.config import infer_family

    assert (infer_family(SD15_UNET), infer_family(SDXL_UNET)) == ("sd15", "sdxl")
    with pytest.raises(ValueError, match=rf"^unsupported UNet: addition_embed_type={re.escape(repr(addition))}, "
                                         rf"class_embed_type={re.escape(repr(klass))}; PainterNet supports SD1\.5- "
                                         r"and SDXL-style UNets$"):
        infer_family(dict(SD15_UNET, addition_embed_type=addition, class_embed_type=klass))


@pytest.mark.parametrize("field, value, message", [
    ("family", "sd21", "family='sd21': expected 'sd15' or 'sdxl'"),
    ("mask_polarity", "inverted", "mask_polarity='inverted': expected 'hole' or 'known'"),
    ("mask_resize", "bilinear", "mask_resize='bilinear': expected 'nearest' or 'area'"),
    ("cross_attention", 1, "cross_attention=1: expected true or false"),
    ("attention_control", "yes", "attention_control='yes': expected true or false"),
    ("masked_fill", 2.001, "painternet_config masked_fill=2.001 must be a finite number in [-1.0, 2.0]; the file is "
                           "damaged"),
    ("masked_fill", -1.001, "painternet_config masked_fill=-1.001 must be a finite number in [-1.0, 2.0]; the file "
                            "is damaged"),
    ("masked_fill", True, "painternet_config masked_fill=True must be a finite number in [-1.0, 2.0]; the file is "
                          "damaged"),
    ("masked_fill", float("inf"), "painternet_config masked_fill=inf must be a finite number in [-1.0, 2.0]; the "
                                  "file is damaged"),
    ("source_format", "ip-adapter", "source_format='ip-adapter': expected one of ['painternet', 'brushnet', "
                                    "'powerpaint-ca']"),
    ("unet", [1], "painternet_config unet must be an object, got [1]; the file is damaged"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 20 else None)
def test_config_fields_are_refused_whole_naming_the_value_and_what_is_expected(field, value, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        PainterNetConfig(**{"family": "sd15", "unet": TINY_SD15_UNET, field: value})


def test_config_accepts_the_bounds_a_read_only_unet_and_a_brushnet_branch():
    from types import MappingProxyType

    for fill in (-1.0, 2.0, 1):
        assert PainterNetConfig(family="sd15", unet=TINY_SD15_UNET, masked_fill=fill).masked_fill == fill
    assert PainterNetConfig(family="sd15", unet=MappingProxyType(TINY_SD15_UNET)).unet == TINY_SD15_UNET
    brushnet = PainterNetConfig(family="sd15", unet=TINY_SD15_UNET, cross_attention=False, attention_control=False,
                                source_format="brushnet")
    assert brushnet.branch_unet_config["mid_block_type"] == "UNetMidBlock2D"
    with pytest.raises(ValueError, match=r"^attention_control=True needs cross_attention=True: ACP reads the branch's "
                                         r"attn2 outputs$"):
        PainterNetConfig(family="sd15", unet=TINY_SD15_UNET, cross_attention=False)
    with pytest.raises(ValueError, match=r"^family='sdxl' does not match the UNet topology \('sd15'\)$"):
        PainterNetConfig(family="sdxl", unet=TINY_SD15_UNET)
    with pytest.raises(ValueError, match=r"^family='sd15' does not match the UNet topology \('sdxl'\)$"):
        PainterNetConfig(family="sd15", unet=TINY_SDXL_UNET)


@pytest.fixture(scope="module")
def branch_path(tmp_path_factory):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    branch = PainterNetBranch.from_unet(UNet2DConditionModel.from_config(TINY_SD15_UNET))
    path = str(tmp_path_factory.mktemp("ckpt") / "branch.safetensors")
    save_branch(path, branch.state_dict(), branch.config)
    return path, branch


def test_save_load_round_trip(branch_path):
    path, branch = branch_path
    sd, config = load_branch(path)
    assert config == branch.config
    ref = branch.state_dict()
    assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)


def test_fresh_branch_copies_the_unet_and_zero_inits_controls():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(TINY_SD15_UNET)
    branch = PainterNetBranch.from_unet(unet)
    w = branch.conv_in.weight
    assert torch.equal(w[:, :4], unet.conv_in.weight) and torch.equal(w[:, 4:8], unet.conv_in.weight)
    assert not w[:, 8].any()
    assert torch.equal(branch.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight,
                       unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight)
    controls = [p for n, p in branch.named_parameters() if n.startswith(("layer_control", "attention_control"))]
    assert controls and not any(p.any() for p in controls)


def test_truncated_and_corrupt_files_are_refused(branch_path, tmp_path):
    path, _ = branch_path
    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_branch(str(truncated))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(struct.pack("<Q", 40) + b"{not json at all, definitely not!!!!!!!}" + data[48:])
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        load_branch(str(corrupt))
    tiny = tmp_path / "empty.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(ValueError, match="too short"):
        load_branch(str(tiny))
    with pytest.raises(FileNotFoundError, match="models/painternet"):
        load_branch(str(tmp_path / "missing.safetensors"))


def test_pickle_is_refused_by_content_whatever_the_name(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match="pickle.*safetensors"):
        load_branch(str(tmp_path / "x.ckpt"))
    torch.save({"w": torch.zeros(1)}, tmp_path / "renamed.safetensors")
    with pytest.raises(ValueError, match="pickle/zip checkpoint"):
        load_branch(str(tmp_path / "renamed.safetensors"))


def test_foreign_safetensors_and_incomplete_branch(branch_path, tmp_path):
    from safetensors.torch import save_file

    path, branch = branch_path
    save_file({"model.diffusion_model.x": torch.zeros(2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ValueError, match="not a PainterNet or BrushNet checkpoint"):
        load_branch(str(tmp_path / "lora.safetensors"))
    sd = {k: v for k, v in branch.state_dict().items() if not k.startswith("attention_control.3.")}
    meta = {"painternet_format": "1", "painternet_config": branch.config.to_json()}
    save_file(sd, str(tmp_path / "partial.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="2 missing keys"):
        load_branch(str(tmp_path / "partial.safetensors"))
    save_file(sd, str(tmp_path / "future.safetensors"), metadata=dict(meta, painternet_format="9"))
    with pytest.raises(ValueError, match="update the pack"):
        load_branch(str(tmp_path / "future.safetensors"))


def test_save_is_atomic_and_checks_completeness(branch_path, tmp_path):
    _, branch = branch_path
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"previous")
    with pytest.raises(ValueError, match="missing"):
        save_branch(str(target), {"conv_in.weight": torch.zeros(1)}, branch.config)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_save_names_how_many_keys_are_missing_and_the_first_three(branch_path, tmp_path):
    _, branch = branch_path
    state = branch.state_dict()
    dropped = sorted(state)[:5]
    partial = {k: v for k, v in state.items() if k not in dropped}
    expected = f"state dict is missing 5 branch keys, e.g. {dropped[:3]}; save the full branch"
    with pytest.raises(ValueError, match=r"^" + re.escape(expected) + "$"):
        save_branch(str(tmp_path / "out.safetensors"), partial, branch.config)


def test_save_writes_a_hidden_temp_file_beside_the_target(branch_path, tmp_path, monkeypatch):
    """The temp file is in the target's folder, so `os.replace` is a rename on one filesystem (atomic), and is named
    `.painternet-*.tmp`: hidden, with a suffix no model-folder listing offers, so a loader listing the folder while a
    save runs never shows it. The folder is created when missing."""
    import safetensors.torch

    path, branch = branch_path
    folder = tmp_path / "models" / "painternet"
    real, seen = safetensors.torch.save_file, []

    def spy(tensors, filename, metadata=None):
        seen.append((filename, sorted(os.listdir(folder))))
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", spy)
    save_branch(str(folder / "branch.safetensors"), branch.state_dict(), branch.config)
    ((temp, listing),) = seen
    assert os.path.dirname(temp) == str(folder)
    assert re.fullmatch(r"\.painternet-[^./]+\.tmp", os.path.basename(temp)), temp
    assert listing == [os.path.basename(temp)]
    assert os.listdir(folder) == ["branch.safetensors"]
    saved, reference = read_header(str(folder / "branch.safetensors")), read_header(path)
    assert (saved.metadata, saved.tensors.keys()) == (reference.metadata, reference.tensors.keys())


def test_a_failed_write_keeps_the_previous_file_removes_the_temp_and_raises_its_error(branch_path, tmp_path,
                                                                                      monkeypatch):
    import safetensors.torch

    _, branch = branch_path
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"previous")

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        save_branch(str(target), branch.state_dict(), branch.config)
    assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["out.safetensors"]


def test_normalize_mask_shapes_and_errors():
    m = torch.zeros(8, 12)
    m[2:4, 3:6] = 0.7
    out = normalize_mask(m, 8, 12, 2)
    assert out.shape == (2, 1, 8, 12) and set(out.unique().tolist()) == {0.0, 1.0}
    assert normalize_mask(m, 16, 24, 1).shape == (1, 1, 16, 24)  # same aspect: resized
    with pytest.raises(ValueError, match="different aspect ratio"):
        normalize_mask(m, 8, 8, 1)
    with pytest.raises(ValueError, match="mask batch 3 does not match image batch 2"):
        normalize_mask(torch.zeros(3, 8, 12), 8, 12, 2)
    with pytest.raises(ValueError, match="NaN"):
        normalize_mask(torch.full((8, 12), float("nan")), 8, 12, 1)


def test_prepare_condition_fill_resize_and_polarity():
    config = PainterNetConfig.from_unet_config(TINY_SD15_UNET, mask_resize="area", masked_fill=0.5)
    image = torch.rand(1, 3, 16, 16)
    mask = torch.zeros(1, 16, 16)
    mask[:, :8, :8] = 1.0
    seen = []

    def encode(px):
        seen.append(px)
        return px[:, :, ::4, ::4].mean(1, keepdim=True).repeat(1, 4, 1, 1)

    cond = prepare_condition(image, mask, encode, config)
    assert cond.shape == (1, 5, 4, 4)
    assert torch.all(seen[0][:, :, :8, :8] == 0.5) and torch.equal(seen[0][:, :, 8:, 8:], image[:, :, 8:, 8:])
    assert cond[0, 4, :2, :2].eq(1).all() and cond[0, 4, 2:, 2:].eq(0).all()
    known = PainterNetConfig.from_unet_config(TINY_SD15_UNET, mask_polarity="known", mask_resize="nearest")
    assert torch.equal(latent_mask(mask[:, None], (4, 4), known), 1 - latent_mask(mask[:, None], (4, 4), config))
    with pytest.raises(ValueError, match="NaN"):
        prepare_condition(torch.full((1, 3, 16, 16), float("nan")), mask, encode, config)


def test_crop_to_multiple_and_empty_mask():
    from painternet_core.conditioning import crop_to_multiple

    image = torch.arange(45 * 67, dtype=torch.float32).reshape(1, 1, 45, 67)
    mask = torch.ones(1, 1, 45, 67)
    cropped, m = crop_to_multiple(image, mask, 8)
    assert cropped.shape[-2:] == (40, 64) and m.shape[-2:] == (40, 64)
    assert cropped[0, 0, 0, 0] == image[0, 0, 2, 1]  # centred: (45 % 8) // 2 rows, (67 % 8) // 2 columns
    with pytest.raises(ValueError, match="at least 8x8 px"):
        crop_to_multiple(torch.zeros(1, 3, 1, 1), torch.zeros(1, 1, 1, 1), 8)
    config = PainterNetConfig.from_unet_config(TINY_SD15_UNET)
    with pytest.raises(ValueError, match="mask is empty"):
        prepare_condition(torch.rand(1, 3, 16, 16), torch.zeros(1, 16, 16), lambda px: px, config)


def test_crop_to_multiple_centres_each_axis_and_refuses_a_thin_image():
    from painternet_core.conditioning import crop_to_multiple

    image = torch.arange(46 * 70, dtype=torch.float32).reshape(1, 1, 46, 70)
    cropped, m = crop_to_multiple(image, torch.ones(1, 1, 46, 70), 8)
    # 6 spare rows and 6 spare columns: 3 cut from the top and 3 from the left.
    assert cropped.shape[-2:] == (40, 64) and m.shape[-2:] == (40, 64)
    assert torch.equal(cropped, image[..., 3:43, 3:67])
    for h, w in ((4, 16), (16, 4)):
        with pytest.raises(ValueError, match=rf"^image is {w}x{h} px; PainterNet needs at least 8x8 px$"):
            crop_to_multiple(torch.zeros(1, 3, h, w), torch.zeros(1, 1, h, w), 8)


def test_latent_mask_follows_the_checkpoint_resize_rule():
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :6, :6] = 1.0
    area = PainterNetConfig.from_unet_config(TINY_SD15_UNET, mask_resize="area")
    nearest = PainterNetConfig.from_unet_config(TINY_SD15_UNET, mask_resize="nearest")
    # Latent cell (1,1) covers pixels 4..7: a quarter of it is hole. "area" averages, "nearest" samples pixel (4,4).
    expected_area = torch.tensor([[1.0, 0.5, 0, 0], [0.5, 0.25, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert torch.equal(latent_mask(mask, (4, 4), area)[0, 0], expected_area)
    assert torch.equal(latent_mask(mask, (4, 4), nearest)[0, 0], mask[0, 0, ::4, ::4])


def test_prepare_condition_refuses_a_bad_image_and_an_empty_mask_with_the_fix():
    config = PainterNetConfig.from_unet_config(TINY_SD15_UNET)
    mask = torch.ones(1, 16, 16)
    with pytest.raises(ValueError, match=r"^image has shape \(1, 4, 16, 16\); expected \(B,3,H,W\)$"):
        prepare_condition(torch.rand(1, 4, 16, 16), mask, lambda px: px, config)
    with pytest.raises(ValueError, match="^image contains NaN or infinite values; fix the node that produced it$"):
        prepare_condition(torch.full((1, 3, 16, 16), float("inf")), mask, lambda px: px, config)
    with pytest.raises(ValueError, match=r"^mask is empty: nothing to inpaint\. Paint the region to generate in "
                                         r"white \(mask = 1\)$"):
        prepare_condition(torch.rand(1, 3, 16, 16), torch.zeros(1, 16, 16), lambda px: px, config)


def test_prepare_condition_without_value_checks_reads_nothing_back():
    """check_values=False (the trainer's step) skips exactly the checks that read values back from the device: the
    same inputs the node refuses go through, while shape errors stay."""
    config = PainterNetConfig.from_unet_config(TINY_SD15_UNET)
    nan_image = torch.full((1, 3, 16, 16), float("nan"))
    cond = prepare_condition(nan_image, torch.ones(1, 16, 16), lambda px: px[:, :, ::8, ::8].repeat(1, 2, 1, 1)[:, :4],
                             config, check_values=False)
    assert cond.shape == (1, 5, 2, 2) and cond[:, 4].eq(1).all()
    empty = prepare_condition(torch.rand(1, 3, 16, 16), torch.zeros(1, 16, 16),
                              lambda px: px[:, :, ::8, ::8].repeat(1, 2, 1, 1)[:, :4], config, check_values=False)
    assert empty[:, 4].eq(0).all()
    nan_mask = torch.full((1, 16, 16), float("nan"))
    assert normalize_mask(nan_mask, 16, 16, 1, check_values=False).eq(0).all()
    with pytest.raises(ValueError, match="mask contains NaN"):
        prepare_condition(torch.rand(1, 3, 16, 16), nan_mask, lambda px: px, config)
    with pytest.raises(ValueError, match=r"expected \(B,3,H,W\)"):
        prepare_condition(torch.rand(1, 4, 16, 16), torch.ones(1, 16, 16), lambda px: px, config, check_values=False)


def test_normalize_mask_layouts_batches_and_threshold():
    mask = torch.zeros(2, 1, 8, 12)
    mask[0, 0, 1, 2] = 0.5  # exactly at the threshold: stays known
    mask[1, 0, 3, 4] = 0.51
    out = normalize_mask(mask, 8, 12, 2)
    assert out.shape == (2, 1, 8, 12)
    assert out.sum() == 1 and out[1, 0, 3, 4] == 1
    assert torch.equal(normalize_mask(mask[:, 0], 8, 12, 2), out)
    with pytest.raises(ValueError, match=r"^mask has shape \(1, 2, 8, 12\); expected \(H,W\), \(B,H,W\) or "
                                         r"\(B,1,H,W\)$"):
        normalize_mask(torch.zeros(1, 2, 8, 12), 8, 12, 1)
    with pytest.raises(ValueError, match=r"^mask batch 3 does not match image batch 2; give one mask or one per "
                                         r"image$"):
        normalize_mask(torch.zeros(3, 8, 12), 8, 12, 2)
    with pytest.raises(ValueError, match="^mask contains NaN or infinite values; fix the node that produced it$"):
        normalize_mask(torch.full((8, 12), float("inf")), 8, 12, 1)


def test_resize_mask_checks_values_unless_told_refuses_no_pixels_and_keeps_one():
    from painternet_core.conditioning import resize_mask

    with pytest.raises(ValueError, match="^mask contains NaN or infinite values; fix the node that produced it$"):
        resize_mask(torch.full((4, 4), float("nan")), 4, 4, 1)
    with pytest.raises(ValueError, match=r"^mask has shape \(0, 1, 4, 4\) \(no pixels\); connect a mask drawn on the "
                                         r"image$"):
        resize_mask(torch.zeros(0, 4, 4), 4, 4, 1)
    assert torch.equal(resize_mask(torch.full((1, 1), 0.7), 1, 1, 1), torch.full((1, 1, 1, 1), 0.7))


@pytest.mark.parametrize("mask_hw,image_hw", [((8, 5), (5, 4)), ((5, 8), (4, 5)), ((5, 4), (8, 5)), ((4, 5), (5, 8)),
                                              ((12, 10), (6, 6))])
def test_normalize_mask_resizes_within_one_largest_side_of_aspect_error(mask_hw, image_hw):
    # The aspect check tolerates |mh*W - mw*H| up to the largest of the four sides (rounding of a resized preview).
    out = normalize_mask(torch.ones(mask_hw), *image_hw, 1)
    assert out.shape == (1, 1, *image_hw) and out.eq(1).all()


def test_normalize_mask_refuses_another_aspect_with_both_sizes():
    with pytest.raises(ValueError, match=r"^mask is 12x8 but the image is 8x8 \(different aspect ratio\); resize or "
                                         r"crop the mask to the image first$"):
        normalize_mask(torch.zeros(8, 12), 8, 8, 1)


def test_prepare_condition_gives_the_mask_channel_the_latent_dtype():
    config = PainterNetConfig.from_unet_config(TINY_SD15_UNET)
    mask = torch.zeros(1, 16, 16)
    mask[:, 4:12, 4:12] = 1.0
    cond = prepare_condition(torch.rand(1, 3, 16, 16), mask, lambda px: px[:, :, ::8, ::8].repeat(1, 2, 1, 1)[:, :4]
                             .half(), config)
    assert cond.dtype == torch.float16 and cond.shape == (1, 5, 2, 2)
    assert torch.equal(cond[0, 4], torch.full((2, 2), 0.25, dtype=torch.float16))


def test_inpaint_inputs_keep_the_soft_mask_for_the_sampler_and_binarise_the_hole():
    from painternet_core.conditioning import inpaint_inputs

    image = torch.rand(2, 20, 27, 3)
    mask = torch.linspace(-0.5, 1.5, 20 * 27).reshape(1, 20, 27)
    pixels, hole, noise = inpaint_inputs(image, mask, 8, "soft")
    expected = mask.clamp(0, 1)[:, 2:18, 1:25].expand(2, 16, 24)  # centre crop to multiples of 8, batch broadcast
    assert pixels.shape == (2, 3, 16, 24) and torch.equal(pixels, image[:, 2:18, 1:25].movedim(-1, 1))
    assert torch.equal(noise[:, 0], expected)
    assert torch.equal(hole[:, 0], (expected > 0.5).float())
    assert ((noise > 0) & (noise < 1)).any()
    _, hole_b, noise_b = inpaint_inputs(image, mask, 8, "binary")
    assert torch.equal(noise_b, hole) and torch.equal(hole_b, hole)
    with pytest.raises(ValueError, match="noise_mask 'fuzzy' is not one of soft, binary"):
        inpaint_inputs(image, mask, 8, "fuzzy")


@pytest.mark.parametrize("shape, message", [
    ((0, 16, 16, 3), "image batch is empty"),
    ((1, 0, 16, 3), "image batch is empty"),
    ((1, 16, 16, 5), "image has 5 channels"),
    ((1, 16, 16, 2), "image has 2 channels"),
    ((16, 16, 3), "must be an IMAGE tensor"),
])
def test_inpaint_inputs_refuse_empty_and_odd_channel_images(shape, message):
    from painternet_core.conditioning import inpaint_inputs

    with pytest.raises(ValueError, match=message):
        inpaint_inputs(torch.zeros(shape), torch.ones(1, 16, 16), 8)


def _int_refusal(name, value, low, high):
    return (rf"^painternet_config unet\.{re.escape(name)}={value} must be an integer in \[{low}, {high}\]; the file is "
            r"damaged or not a supported SD1\.5/SDXL branch$")


WIDE = dict(TINY_SD15_UNET, block_out_channels=[256, 256, 512, 512])
SDXL_TOPOLOGY = dict(SDXL_UNET, block_out_channels=[32, 32, 64], attention_head_dim=[2, 2, 4], cross_attention_dim=64)
# (topology, field, the largest value a stored config may hold, the smallest)
INT_BOUNDS = [
    (TINY_SD15_UNET, "layers_per_block", 4, 1),
    (TINY_SD15_UNET, "transformer_layers_per_block", 16, 1),
    (WIDE, "attention_head_dim", 256, 1),
    (WIDE, "num_attention_heads", 256, 1),
    (TINY_SD15_UNET, "cross_attention_dim", 8192, 1),
    (TINY_SD15_UNET, "in_channels", 16, 1),
    (TINY_SD15_UNET, "out_channels", 16, 1),
    (SDXL_TOPOLOGY, "addition_time_embed_dim", 16384, 1),
    (SDXL_TOPOLOGY, "projection_class_embeddings_input_dim", 16384, 1),
    (TINY_SD15_UNET, "addition_embed_type_num_heads", 256, 1),
]


@pytest.mark.parametrize("unet,name,high,low", INT_BOUNDS, ids=[b[1] for b in INT_BOUNDS])
def test_validate_unet_integer_bounds_are_inclusive_and_named(unet, name, high, low):
    from painternet_core.config import validate_unet

    for good in (low, high):
        validate_unet(dict(unet, **{name: good}))
    for bad in (low - 1, high + 1):
        with pytest.raises(ValueError, match=_int_refusal(name, bad, 1, high)):
            validate_unet(dict(unet, **{name: bad}))


def test_validate_unet_channel_block_and_type_rules():
    from painternet_core.config import validate_unet

    validate_unet(dict(TINY_SD15_UNET, block_out_channels=[4096] * 4, attention_head_dim=8))
    with pytest.raises(ValueError, match=_int_refusal("block_out_channels[1]", 4097, 1, 4096)):
        validate_unet(dict(TINY_SD15_UNET, block_out_channels=[32, 4097, 64, 64]))
    with pytest.raises(ValueError, match=_int_refusal("block_out_channels[0]", True, 1, 4096)):
        validate_unet(dict(TINY_SD15_UNET, block_out_channels=[True, 32, 64, 64]))
    six = dict(TINY_SD15_UNET, block_out_channels=[32] * 6, down_block_types=["DownBlock2D"] * 6,
               up_block_types=["UpBlock2D"] * 6)
    validate_unet(six)
    validate_unet(dict(six, block_out_channels=(32,), down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",)))
    with pytest.raises(ValueError, match=r"^painternet_config unet\.block_out_channels=\[32, 32, 32, 32, 32, 32, 32\] "
                                         r"must be a list of 1 to 6 channel counts; the file is damaged$"):
        validate_unet(dict(six, block_out_channels=[32] * 7))
    with pytest.raises(ValueError, match=r"^painternet_config unet\.block_out_channels=\[64, 96, 64, 64\]: entry 1 "
                                         r"\(96\) must be a multiple of norm_num_groups \(32\) and of the first entry; "
                                         r"the file is damaged$"):
        validate_unet(dict(TINY_SD15_UNET, block_out_channels=[64, 96, 64, 64]))
    with pytest.raises(ValueError, match=r"^painternet_config unet\.up_block_types=\['UpBlock2D'\] must list 4 of "
                                         r"\['CrossAttnUpBlock2D', 'UpBlock2D'\]$"):
        validate_unet(dict(TINY_SD15_UNET, up_block_types=["UpBlock2D"]))
    with pytest.raises(ValueError, match=r"^painternet_config unet\.layers_per_block has 3 entries, expected 4 \(one per "
                                         r"block\): \[1, 2, 2\]; the file is damaged$"):
        validate_unet(dict(TINY_SD15_UNET, layers_per_block=[1, 2, 2]))
    with pytest.raises(ValueError, match=r"^painternet_config unet\.attention_head_dim\[0\]=3 does not divide 32 "
                                         r"channels$"):
        validate_unet(dict(TINY_SD15_UNET, attention_head_dim=3, num_attention_heads=None))


def test_prepare_condition_without_value_checks_passes_them_to_the_mask_too():
    # A NaN mask pixel binarises to "known" when the trainer's step skips the value checks, in prepare_condition as
    # in normalize_mask: the skip reaches normalize_mask.
    config = PainterNetConfig.from_unet_config(TINY_SD15_UNET)
    image = torch.rand(1, 3, 16, 16)
    mask = torch.zeros(1, 16, 16)
    mask[:, 8:, 8:] = 1.0
    nan_mask = mask.clone()
    nan_mask[0, 0, 0] = float("nan")

    def encode(px):
        return px[:, :, ::8, ::8].repeat(1, 2, 1, 1)[:, :4]

    expected = prepare_condition(image, mask, encode, config)
    assert torch.equal(prepare_condition(image, nan_mask, encode, config, check_values=False), expected)


def test_check_image_names_the_shape_the_channels_and_the_fix():
    from painternet_core.conditioning import check_image

    assert check_image(torch.zeros(2, 5, 7, 4)) == (2, 5, 7, 4)
    not_image = r" must be an IMAGE tensor \(B, H, W, C\), got {}; connect an image output \(e\.g\. Load Image\)$"
    with pytest.raises(ValueError, match="^image" + not_image.format("list")):
        check_image([[0.0]])
    with pytest.raises(ValueError, match="^image" + not_image.format(r"\(16, 16, 3\)")):
        check_image(torch.zeros(16, 16, 3))
    with pytest.raises(ValueError, match=r"^image batch is empty \(shape \(1, 16, 0, 3\)\): nothing to work on; check "
                                         r"the node that produced it \(e\.g\. a batch split or a filter that kept no "
                                         r"image\)$"):
        check_image(torch.zeros(1, 16, 0, 3))
    fix = r" \(RGB / RGBA\); convert it first \(e\.g\. split off the extra channels\)$"
    with pytest.raises(ValueError, match=r"^image has 1 channel \(shape \(1, 2, 2, 1\)\); expected 3 or 4" + fix):
        check_image(torch.zeros(1, 2, 2, 1))
    with pytest.raises(ValueError, match=r"^image has 5 channels \(shape \(1, 2, 2, 5\)\); expected 1, 3 or 4" + fix):
        check_image(torch.zeros(1, 2, 2, 5), channels=(1, 3, 4))
    with pytest.raises(ValueError, match=r"^image has 4 channels \(shape \(1, 2, 2, 4\)\); expected 3" + fix):
        check_image(torch.zeros(1, 2, 2, 4), channels=(3,))


def test_inpaint_inputs_drop_alpha_keep_the_threshold_and_quote_a_bad_mode_bounded():
    from painternet_core.conditioning import inpaint_inputs

    image = torch.rand(1, 8, 8, 4)
    mask = torch.full((1, 8, 8), 0.5)
    mask[0, :4] = 0.75
    pixels, hole, noise = inpaint_inputs(image, mask, 8, "soft")
    assert torch.equal(pixels, image[..., :3].movedim(-1, 1))
    assert hole[0, 0, :4].eq(1).all() and hole[0, 0, 4:].eq(0).all()  # exactly 0.5 is not hole
    assert torch.equal(noise[0, 0], mask[0])
    with pytest.raises(ValueError, match=rf"^noise_mask '{'x' * 200}' is not one of soft, binary$"):
        inpaint_inputs(image, mask, 8, "x" * 300)
