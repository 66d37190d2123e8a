"""The help ComfyUI's frontend shows for the pack: a node-help page web/docs/<node id>.md per registered node (the
frontend fetches /extensions/<pack>/docs/<node>.md) naming every input, and the locales/<lang>/ files ComfyUI serves
on /i18n (display names, input names, tooltips, outputs, categories) for English and Chinese, covering every node and
input and nothing stale."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import REPO
from harness.comfy_helpers import load_pack, pack_module

ROOT = Path(REPO)
DOCS = ROOT / "web" / "docs"
LANGS = ("en", "zh")


@pytest.fixture(scope="module")
def schemas():
    load_pack()
    return {cls.GET_SCHEMA().node_id: cls.GET_SCHEMA() for cls in pack_module("nodes").NODES}


def test_every_node_has_a_help_page_naming_every_input(schemas):
    assert schemas, "no nodes registered"
    for node_id, schema in schemas.items():
        page = DOCS / f"{node_id}.md"
        assert page.is_file(), f"{node_id} has no node-help page {page.relative_to(ROOT)}"
        text = page.read_text(encoding="utf-8")
        assert text.startswith(f"# {schema.display_name}\n"), f"{page.name} must start with the node's display name"
        missing = [i.id for i in schema.inputs if f"`{i.id}`" not in text]
        assert not missing, f"{page.name} does not describe inputs {missing}"


def test_help_pages_link_only_pictures_that_ship():
    pictures = set()
    for page in DOCS.glob("*.md"):
        for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            assert (DOCS / target).is_file(), f"{page.name} shows {target}, which is not in web/docs"
            pictures.add(target)
    assert pictures == {p.name for p in DOCS.glob("*.png")}, "a picture in web/docs that no help page shows"


def _locale(lang: str, name: str) -> dict:
    with open(ROOT / "locales" / lang / name, encoding="utf-8") as fh:
        return json.load(fh)


@pytest.mark.parametrize("lang", LANGS)
def test_locale_covers_every_node_input_output_and_category(schemas, lang):
    defs = _locale(lang, "nodeDefs.json")
    assert set(defs) == set(schemas), f"{lang}: nodes missing or stale"
    for node_id, schema in schemas.items():
        entry = defs[node_id]
        assert entry.get("display_name") and entry.get("description"), f"{lang}/{node_id}"
        assert set(entry["inputs"]) == {i.id for i in schema.inputs}, f"{lang}/{node_id}: inputs missing or stale"
        for name, text in entry["inputs"].items():
            assert text.get("name") and text.get("tooltip"), f"{lang}/{node_id}.{name}"
        assert set(entry["outputs"]) == {str(k) for k in range(len(schema.outputs))}, f"{lang}/{node_id} outputs"
        for index, text in entry["outputs"].items():
            assert text.get("name") and text.get("tooltip"), f"{lang}/{node_id} output {index}"
    categories = _locale(lang, "main.json")["nodeCategories"]
    for schema in schemas.values():
        for part in schema.category.split("/"):
            assert categories.get(part), f"{lang}: category {part!r} untranslated"


def test_english_matches_the_schema_and_chinese_is_translated(schemas):
    en, zh = _locale("en", "nodeDefs.json"), _locale("zh", "nodeDefs.json")
    for node_id, schema in schemas.items():
        assert en[node_id]["display_name"] == schema.display_name
        assert en[node_id]["description"] == schema.description
        for i in schema.inputs:
            assert en[node_id]["inputs"][i.id] == {"name": i.id, "tooltip": i.tooltip}, f"{node_id}.{i.id}"
        han = re.compile(r"[\u4e00-\u9fff]")
        assert han.search(zh[node_id]["display_name"]) and han.search(zh[node_id]["description"]), node_id
        for name, text in zh[node_id]["inputs"].items():
            assert han.search(text["tooltip"]), f"zh {node_id}.{name} tooltip is not translated"


def test_comfyui_serves_the_locales_on_i18n(monkeypatch):
    """ComfyUI's own loader (app.custom_node_manager, behind GET /i18n) finds the files where the pack keeps them."""
    import importlib.util
    import sys

    import folder_paths

    from harness import COMFYUI_PATH
    from harness.comfy_helpers import CACHE

    load_pack()  # links the checkout into CACHE/custom_nodes, as ComfyUI's custom_nodes folder holds packs
    # In-process, comfy/ is on sys.path and its utils.py shadows ComfyUI's top-level utils package the manager uses.
    spec = importlib.util.spec_from_file_location("utils", str(Path(COMFYUI_PATH) / "utils" / "__init__.py"),
                                                  submodule_search_locations=[str(Path(COMFYUI_PATH) / "utils")])
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    monkeypatch.setitem(sys.modules, "utils", utils)
    monkeypatch.delitem(sys.modules, "utils.json_util", raising=False)
    monkeypatch.delitem(sys.modules, "app.custom_node_manager", raising=False)
    from app.custom_node_manager import CustomNodeManager

    monkeypatch.setattr(folder_paths, "get_folder_paths",
                        lambda kind: [str(Path(CACHE) / "custom_nodes")] if kind == "custom_nodes" else [])
    translations = CustomNodeManager.build_translations.__wrapped__(CustomNodeManager())
    assert translations["zh"]["nodeDefs"]["PainterNetApply"]["display_name"] == "应用 PainterNet"
    assert translations["zh"]["nodeCategories"]["PainterNet"] == "PainterNet"
    assert translations["en"]["nodeDefs"]["PainterNetCrop"]["inputs"]["feather"]["name"] == "feather"
