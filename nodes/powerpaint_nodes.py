"""PowerPaint v2 nodes: the task-embedding loader, the task-aware prompt encoder, Apply PowerPaint, and the
outpainting canvas. Thin V3 adapters over `painternet_core.powerpaint` / `outpaint` and the shared injection."""
from __future__ import annotations

from typing import Any

from comfy_api.v0_0_2 import io

from painternet_core.outpaint import BAND, MAX_PAD
from painternet_core.powerpaint import TASK_NAMES

from .limits import check_inputs, interrupt_poll, widget_check
from .painternet_nodes import PainterNet, PainterNetStitchInfo

CATEGORY = "inpaint/PainterNet"
PowerPaintTasksType = io.Custom("POWERPAINT_TASKS")
TEXT_ENCODER_FOLDERS = ("text_encoders", "inpaint")
TASK_TOOLTIP = ("text-guided: fill with what the prompt says. shape-guided: an object that follows the mask's shape "
                "(fitting). object-removal: erase and fill with background. outpainting: extend the picture (pad it "
                "with PainterNet Outpaint Pad). context-aware: fill from the surroundings.")


def _files(folders: tuple[str, ...]) -> list[str]:
    import folder_paths

    names: list[str] = []
    for folder in folders:
        if folder in folder_paths.folder_names_and_paths:
            names += [n for n in folder_paths.get_filename_list(folder) if n not in names]
    return names


def _path(folders: tuple[str, ...], name: str) -> str | None:
    import folder_paths

    for folder in folders:
        if folder in folder_paths.folder_names_and_paths:
            path = folder_paths.get_full_path(folder, name)
            if path is not None:
                return path
    return None


def _task_input() -> io.Combo.Input:
    return io.Combo.Input("task", options=list(TASK_NAMES), default="object-removal", tooltip=TASK_TOOLTIP)


class PowerPaintTaskEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PowerPaintTaskEncoder", display_name="Load PowerPaint Task Encoder", category=CATEGORY,
            description="Loads PowerPaint v2's text encoder, encodes its task tokens (P_ctxt, P_shape, P_obj) once "
                        "and frees it. Plug the output into Apply PowerPaint.",
            inputs=[io.Combo.Input("text_encoder_name", options=_files(TEXT_ENCODER_FOLDERS), tooltip=(
                "PowerPaint v2's text encoder (powerpaint_brushnet_text_encoder_fp16.safetensors, or "
                "PowerPaint_Brushnet/pytorch_model.bin converted to safetensors) from models/text_encoders or "
                "models/inpaint. Not the checkpoint's CLIP."))],
            outputs=[PowerPaintTasksType.Output(display_name="tasks", tooltip=(
                "The branch's task embeddings (about 1 MB); the encoder itself is freed."))],
        )

    @classmethod
    def validate_inputs(cls, text_encoder_name: str) -> bool | str:
        return widget_check(cls, locals())

    @classmethod
    def execute(cls, text_encoder_name: str) -> io.NodeOutput:
        check_inputs(cls, locals())
        from .powerpaint import load_task_embeddings

        path = _path(TEXT_ENCODER_FOLDERS, text_encoder_name)
        if path is None:
            raise FileNotFoundError(f"PowerPaint text encoder {text_encoder_name[:200]!r} not found in "
                                    "models/text_encoders or models/inpaint; refresh the node list or copy it there")
        return io.NodeOutput(load_task_embeddings(path))


class PowerPaintTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PowerPaintTextEncode", display_name="PowerPaint Text Encode", category=CATEGORY,
            description="CLIP Text Encode with PowerPaint v2's per-task suffix appended to the base model's prompt.",
            inputs=[
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP (the base model's prompt encoder)."),
                io.String.Input("text", multiline=True, dynamic_prompts=True, tooltip=(
                    "The base model's prompt (may be empty for removal and outpainting).")),
                _task_input(),
                io.Boolean.Input("append_suffix", default=True, tooltip=(
                    "Append PowerPaint's base-prompt suffix for the task: ' empty scene blur' for removal, ' empty "
                    "scene' for outpainting and context-aware, nothing for text- and shape-guided.")),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning",
                                            tooltip="The base model's positive conditioning.")],
        )

    @classmethod
    def validate_inputs(cls, task: str, **_: Any) -> bool | str:
        return widget_check(cls, {"task": task})

    @classmethod
    def execute(cls, clip: Any, text: str, task: str, append_suffix: bool) -> io.NodeOutput:
        check_inputs(cls, locals())
        from painternet_core.powerpaint import base_prompt

        if clip is None:
            raise RuntimeError("clip input is invalid: None; the checkpoint has no text encoder, load one with a "
                               "CLIP loader")
        tokens = clip.tokenize(base_prompt(text, task, append_suffix))
        return io.NodeOutput(clip.encode_from_tokens_scheduled(tokens))


class PowerPaintApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PowerPaintApply", display_name="Apply PowerPaint", category=CATEGORY,
            description="Attaches a PowerPaint v2 branch driven by its task tokens (its own context per cond/uncond "
                        "row), never by the prompt; the base model keeps your prompt.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.5 checkpoint's model (PowerPaint v2 was trained with "
                                                "Realistic Vision 6; other SD1.5 fine-tunes work)."),
                io.Vae.Input("vae", tooltip="The VAE that encodes the image and the masked image."),
                io.Image.Input("image", tooltip="The image to inpaint (outpainting: the padded canvas)."),
                io.Mask.Input("mask", tooltip="White (1) = region to generate."),
                PainterNet.Input("painternet", tooltip="PowerPaint v2 branch (PowerPaint_Brushnet/"
                                                       "diffusion_pytorch_model.safetensors) from Load PainterNet."),
                PowerPaintTasksType.Input("tasks", tooltip="From Load PowerPaint Task Encoder."),
                io.Conditioning.Input("positive", tooltip="The base model's prompt (PowerPaint Text Encode appends the "
                                                          "task's suffix). The branch never sees it."),
                io.Conditioning.Input("negative", tooltip="The base model's negative prompt."),
                _task_input(),
                io.Float.Input("fitting", default=1.0, min=0.0, max=1.0, step=0.05, tooltip=(
                    "Fitting degree t: branch context t·E(A) + (1−t)·E(B). Matters for shape-guided (1 = follow "
                    "the mask's shape, lower = freer shape).")),
                io.Float.Input("scale", default=1.0, min=0.0, max=10.0, step=0.01, tooltip=(
                    "Branch scale (PowerPaint's brushnet_conditioning_scale, 1 by default). 0 disables the branch.")),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which the branch starts acting."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress after which the branch stops (and is not run)."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip=(
                    "The model with the PowerPaint branch attached (the input model is left untouched).")),
                io.Conditioning.Output(display_name="positive", tooltip="Positive conditioning, unchanged."),
                io.Conditioning.Output(display_name="negative", tooltip="Negative conditioning, unchanged."),
                io.Latent.Output(display_name="latent", tooltip=(
                    "The encoded image with noise_mask: sample it with denoise 1.0.")),
            ],
        )

    @classmethod
    def validate_inputs(cls, task: str, **_: Any) -> bool | str:
        return widget_check(cls, {"task": task})

    @classmethod
    def execute(cls, model: Any, vae: Any, image: Any, mask: Any, painternet: Any, tasks: Any, positive: Any,
                negative: Any, task: str, fitting: float, scale: float, start_percent: float,
                end_percent: float) -> io.NodeOutput:
        check_inputs(cls, locals())
        from painternet_core.powerpaint import PowerPaintTasks

        from .injection import BranchContext, apply_painternet
        from .painternet_nodes import prepare_inpaint
        from .powerpaint import check_tasks_fit, require_powerpaint

        require_powerpaint(painternet, "PowerPaintApply")
        if not isinstance(tasks, PowerPaintTasks):
            raise ValueError(f"PowerPaintApply: tasks must come from Load PowerPaint Task Encoder, got "
                             f"{type(tasks).__name__}")
        check_tasks_fit(tasks, painternet)
        cond, uncond = tasks.context(task, fitting)
        condition, latent = prepare_inpaint(model, vae, image, mask, painternet, "soft", "PowerPaintApply")
        patched = apply_painternet(model, painternet, condition, scale, start_percent, end_percent,
                                   branch_context=BranchContext(cond=cond, uncond=uncond))
        return io.NodeOutput(patched, positive, negative, latent)


class PainterNetOutpaintPad(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        def side(name: str, default: int, tooltip: str) -> io.Int.Input:
            return io.Int.Input(name, default=default, min=0, max=MAX_PAD, step=8, tooltip=tooltip)

        return io.Schema(
            node_id="PainterNetOutpaintPad", display_name="PainterNet Outpaint Pad", category=CATEGORY,
            description="Outpainting canvas as PowerPaint's demo builds it: pad each side with grey and mask the "
                        "padding plus a band inside the original's edges. Sample with Apply PowerPaint (task "
                        "outpainting), decode, then PainterNet Stitch.",
            inputs=[
                io.Image.Input("image", tooltip="The picture to extend."),
                side("left", 0, "Pixels added on the left."),
                side("top", 0, "Pixels added at the top."),
                side("right", 256, "Pixels added on the right (plus what rounds the width up to a multiple of 8)."),
                side("bottom", 0, "Pixels added at the bottom (plus what rounds the height up to a multiple of 8)."),
                io.Int.Input("band", default=BAND, min=0, max=256, step=1, tooltip=(
                    "Pixels just inside the original's edge regenerated on each padded side (PowerPaint's demo: "
                    "10), so the new content grows out of the picture.")),
                io.Int.Input("feather", default=8, min=0, max=256, step=1, tooltip=(
                    "Width of the blend band PainterNet Stitch uses outside the masked area; pixels farther in are "
                    "the original's, bit for bit.")),
                io.Mask.Input("mask", optional=True, tooltip="Holes inside the original to regenerate as well "
                                                             "(1 = generate)."),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip=(
                    "The padded canvas, grey (127) outside the original; sides multiples of 8.")),
                io.Mask.Output(display_name="mask", tooltip="1 on the padding and the inner band (and any input mask)."),
                PainterNetStitchInfo.Output(display_name="stitch", tooltip=(
                    "For PainterNet Stitch: pastes the decoded canvas back, keeping the original's pixels.")),
            ],
        )

    @classmethod
    def execute(cls, image: Any, left: int, top: int, right: int, bottom: int, band: int, feather: int,
                mask: Any = None) -> io.NodeOutput:
        check_inputs(cls, locals())
        from painternet_core.outpaint import pad_batch

        try:
            return io.NodeOutput(*pad_batch(image, left, top, right, bottom, band=band, feather=feather, mask=mask,
                                            check=interrupt_poll()))
        except ValueError as err:
            raise ValueError(f"PainterNetOutpaintPad: {err}") from err


NODES: list[type[io.ComfyNode]] = [PowerPaintTaskEncoder, PowerPaintTextEncode, PowerPaintApply,
                                   PainterNetOutpaintPad]
