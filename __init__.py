"""ComfyUI entry point of the PainterNet pack.

ComfyUI imports this file as a package and silently drops packs whose import fails, so it only registers the
`painternet` model folder and hands ComfyUI the V3 extension (`comfy_entrypoint`, ComfyUI's versioned node API);
everything heavy is imported inside node functions. There is deliberately no NODE_CLASS_MAPPINGS: ComfyUI would take
it first and skip the entrypoint.
"""
import importlib.util
import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))


def _register_core() -> None:
    """Make `painternet_core`, and nothing else of the pack, importable by its absolute name.

    The core and the nodes import `painternet_core` by that name, the one the trainer and tests use, so a checkpoint
    config object is one class wherever it was made. Why not the pack folder on `sys.path`: `training`, `tests`,
    `bench`, `harness` and `scripts` would then shadow same-named modules for every pack loaded after this one. An
    already imported `painternet_core` (the trainer's, a test's) is kept, so there is never a second copy.
    """
    if "painternet_core" in sys.modules:
        return
    folder = os.path.join(_PACK_DIR, "painternet_core")
    spec = importlib.util.spec_from_file_location("painternet_core", os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules["painternet_core"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["painternet_core"]
        raise


_register_core()

import folder_paths  # noqa: E402  (ComfyUI's, present whenever ComfyUI loads us)

from .nodes import comfy_entrypoint  # noqa: E402

folder_paths.add_model_folder_path("painternet", os.path.join(folder_paths.models_dir, "painternet"), is_default=True)
# Pickle extensions are listed on purpose: the loader refuses them with a message on how to convert, instead of
# leaving the user wondering why their file is not in the list.
folder_paths.folder_names_and_paths["painternet"][1].update(folder_paths.supported_pt_extensions)
# models/inpaint is where ComfyUI-BrushNet users keep BrushNet and PowerPaint files (branches and PowerPaint's text
# encoder): the loaders list it too, and an `inpaint:` key in extra_model_paths.yaml adds folders to it.
folder_paths.add_model_folder_path("inpaint", os.path.join(folder_paths.models_dir, "inpaint"))
folder_paths.folder_names_and_paths["inpaint"][1].update(folder_paths.supported_pt_extensions)

WEB_DIRECTORY = "./web"

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
