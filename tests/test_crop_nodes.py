"""PainterNetCrop / PainterNetStitch as ComfyUI loads them: limits on linked inputs, error messages that name the
node and the fix, the interrupt poll between batch items, and a crop → stitch round trip through the node classes."""
from __future__ import annotations

import pytest
import torch

from harness.comfy_helpers import load_pack


def nodes():
    mappings = load_pack()
    return mappings["PainterNetCrop"], mappings["PainterNetStitch"]


def picture(batch: int = 1, height: int = 90, width: int = 120) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(batch, height, width, 3, generator=g)


def hole(batch: int = 1, height: int = 90, width: int = 120) -> torch.Tensor:
    m = torch.zeros(batch, height, width)
    m[:, 30:50, 40:70] = 1.0
    return m


def crop_args(**overrides):
    args = {"image": picture(), "mask": hole(), "resolution": 64, "context": 0.5, "grow": 4, "feather": 6}
    args.update(overrides)
    return args


def test_nodes_are_registered_with_tooltips():
    mappings = load_pack()
    for node in ("PainterNetCrop", "PainterNetStitch"):
        cls = mappings[node]
        assert cls.CATEGORY == "inpaint/PainterNet"
        for section in cls.INPUT_TYPES().values():
            for name, spec in section.items():
                assert spec[1].get("tooltip"), f"{node}.{name} has no tooltip"
    inputs = mappings["PainterNetCrop"].INPUT_TYPES()
    assert list(inputs["required"]) == ["image", "mask", "resolution", "context", "grow", "feather"]
    assert "painternet" in inputs["optional"]
    assert list(mappings["PainterNetCrop"].RETURN_TYPES) == ["IMAGE", "MASK", "PAINTERNET_STITCH"]
    assert list(mappings["PainterNetStitch"].INPUT_TYPES()["required"]) == ["stitch", "image", "blend",
                                                                            "color_match"]


def test_round_trip_through_the_nodes_keeps_the_kept_pixels():
    crop, stitch = nodes()
    args = crop_args()
    image, mask, info = crop.execute(**args)
    assert image.shape[1] * image.shape[2] == pytest.approx(64 * 64, rel=0.3)
    assert image.shape[1] % 8 == 0 and image.shape[2] % 8 == 0 and mask.shape == image.shape[:3]
    (out,) = stitch.execute(info, torch.zeros_like(image), "feather", "none")
    assert out.shape == args["image"].shape
    keep = torch.ones(90, 120, dtype=torch.bool)
    keep[30 - 4 - 6:50 + 4 + 6, 40 - 4 - 6:70 + 4 + 6] = False
    assert torch.equal(out[0][keep], args["image"][0][keep])
    assert float(out[0, 35:45, 45:65].abs().max()) == 0.0


@pytest.mark.parametrize("override,message", [
    ({"grow": -1}, "input grow=-1 is outside [0, 4096]"),
    ({"feather": 10 ** 9}, "input feather=1000000000 is outside [0, 4096]"),
    ({"feather": True}, "input feather=True must be an integer"),
    ({"resolution": "512"}, "input resolution='512' must be an integer"),
    ({"resolution": 16}, "resolution 16 is too small"),
    ({"resolution": 0}, "no PainterNet branch is connected; connect Load PainterNet"),
    ({"context": float("nan")}, "input context=nan must be a finite number"),
    ({"context": 10 ** 400}, "input context=1000000000"),
    ({"context_min": -5}, "input context_min=-5 is outside [0, 8192]"),
    ({"mask": hole(height=45, width=60)}, "mask is 60x45 but the image is 120x90"),
    ({"mask": hole(batch=3), "image": picture(batch=2)}, "mask batch 3 does not match image batch 2; give one mask"),
    ({"mask": torch.zeros(1, 90, 120)}, "the mask is empty: nothing to inpaint"),
    ({"mask": torch.cat([hole(), torch.zeros(1, 90, 120)]), "image": picture(batch=2)}, "mask 1 of the batch is empty"),
    ({"image": picture()[..., :1]}, "image has 1 channel (shape (1, 90, 120, 1)); expected 3 or 4"),
    ({"image": picture()[:0]}, "image batch is empty (shape (0, 90, 120, 3))"),
    ({"image": torch.cat([picture(), picture()[..., :2]], dim=-1)}, "image has 5 channels"),
    ({"image": picture().masked_fill(torch.rand(1, 90, 120, 3) > 0.99, float("nan"))}, "image contains NaN"),
])
def test_crop_refuses_bad_inputs_naming_the_node(override, message):
    crop, _ = nodes()
    with pytest.raises(ValueError) as err:
        crop.execute(**crop_args(**override))
    assert str(err.value).startswith("PainterNetCrop: ")
    assert message in str(err.value)


def test_stitch_refuses_another_crop_or_bad_choices():
    crop, stitch = nodes()
    image, _, info = crop.execute(**crop_args())
    other, _, _ = crop.execute(**crop_args(resolution=128))
    with pytest.raises(ValueError, match=r"^PainterNetStitch: image is \d+x\d+ but this stitch's crops are"):
        stitch.execute(info, other, "feather", "none")
    with pytest.raises(ValueError, match="^PainterNetStitch: image batch 2 does not match the 1 crop"):
        stitch.execute(info, image.repeat(2, 1, 1, 1), "feather", "none")
    with pytest.raises(ValueError, match="^PainterNetStitch: stitch must come from a PainterNetCrop node"):
        stitch.execute({"boxes": []}, image, "feather", "none")
    with pytest.raises(ValueError) as err:
        stitch.execute(info, image, "poisson" * 100, "none")
    assert "is not one of ['feather', 'laplacian', 'poisson']" in str(err.value) and len(str(err.value)) < 400
    with pytest.raises(ValueError, match="PainterNetStitch: input color_match='lab' is not one of"):
        stitch.execute(info, image, "feather", "lab")


def test_interrupt_is_polled_between_items():
    import comfy.model_management as mm

    crop, stitch = nodes()
    image, _, info = crop.execute(**crop_args())
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            crop.execute(**crop_args())
        mm.interrupt_current_processing(True)
        with pytest.raises(mm.InterruptProcessingException):
            stitch.execute(info, image, "feather", "none")
    finally:
        mm.interrupt_current_processing(False)
