"""ComfyUI entry point of the PainterNet pack.

ComfyUI imports this file as a package and silently drops packs whose import fails, so it only registers the
`painternet` model folder and collects the node classes; everything heavy is imported inside node functions.
"""
import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
# The core and the nodes import `painternet_core` by its absolute name, the same name the trainer and tests use,
# so a checkpoint config object is one class wherever it was made.
if _PACK_DIR not in sys.path:
    sys.path.insert(0, _PACK_DIR)

import folder_paths  # noqa: E402  (ComfyUI's, present whenever ComfyUI loads us)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

folder_paths.add_model_folder_path("painternet", os.path.join(folder_paths.models_dir, "painternet"), is_default=True)
# Pickle extensions are listed on purpose: the loader refuses them with a message on how to convert, instead of
# leaving the user wondering why their file is not in the list.
folder_paths.folder_names_and_paths["painternet"][1].update(folder_paths.supported_pt_extensions)

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
