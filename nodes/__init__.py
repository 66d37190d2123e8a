"""ComfyUI adapters: each module here holds thin V3 node classes (`comfy_api.v0_0_2.io.ComfyNode`) over
`painternet_core` and lists them in `NODES`; the pack's `comfy_entrypoint` registers them."""
import importlib

from comfy_api.v0_0_2 import ComfyExtension, io

# One entry per node module; each exports NODES, its node classes in menu order.
_NODE_MODULES: tuple[str, ...] = ("painternet_nodes", "mask_nodes", "box_mask_nodes", "crop_nodes", "powerpaint_nodes")

NODES: list[type[io.ComfyNode]] = [
    node for name in _NODE_MODULES for node in importlib.import_module(f".{name}", __name__).NODES]


class PainterNetExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> PainterNetExtension:
    """What ComfyUI's `load_custom_node` calls for a pack without NODE_CLASS_MAPPINGS."""
    return PainterNetExtension()
