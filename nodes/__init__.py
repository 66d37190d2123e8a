"""ComfyUI adapters: each module here holds thin node classes over `painternet_core` and exports its mappings."""
import importlib

# One entry per node module; each exports NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS.
_NODE_MODULES: tuple[str, ...] = ("painternet_nodes", "mask_nodes", "box_mask_nodes", "crop_nodes")

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
for _name in _NODE_MODULES:
    _module = importlib.import_module(f".{_name}", __name__)
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
