"""The node-help panel and the Chinese locale in a real browser, on the frontend ComfyUI 0.3.75 pins and the newest
one (the servers and browser of tests/test_web_browser.py). The panel is opened the way a user opens it: select an
Apply PainterNet node on the canvas and click the selection toolbox's info button ("?", data-testid="info-button").
1.32.9 then shows the node library's help page, 1.58.1 the right-side panel's "Info" tab; both must show the pack's
web/docs page. With the UI language set to Chinese the node's name must be the translated one (newest frontend;
1.32.9 drops custom-node translations, a strict known failure).
PAINTERNET_UPDATE_SCREENSHOT=1 saves the panels as docs/node_help_panel.png (pinned) and docs/node_help_panel_1.58.png
(newest)."""
from __future__ import annotations

import os
import shutil

import pytest
import requests

from conftest import REPO
from test_web_browser import APP, _wait, browser, server  # noqa: F401  (fixtures shared with the editor test)

pytestmark = [pytest.mark.server, pytest.mark.browser]

NODE = "PainterNetApply"
SCREENSHOTS = {"pinned-1.32.9": os.path.join(REPO, "docs", "node_help_panel.png"),
               "newest-1.58.1": os.path.join(REPO, "docs", "node_help_panel_1.58.png")}
STORES = "document.getElementById('vue-app').__vue_app__.config.globalProperties.$pinia._s"
# One Apply PainterNet node on an empty canvas, clear of the top bar (the toolbox floats above the node), selected as a
# click on it selects it: the selection toolbox follows the selection.
ADD_AND_SELECT = f"""() => {{
    const app = {APP};
    app.graph.clear();
    app.canvas.ds.offset = [0, 0];
    app.canvas.ds.scale = 1;
    const node = LiteGraph.createNode("{NODE}");
    node.pos = [360, 260];
    app.graph.add(node);
    app.canvas.selectNode(node);
    app.graph.setDirtyCanvas(true, true);
    return node.id;
}}"""
# Text only web/docs/PainterNetApply.md has (not the tooltips the panel falls back to without a page).
DOC_TEXT = "a red vase"


def _page(browser, server, locale: str):
    requests.post(f"{server.url}/settings", json={"Comfy.Locale": locale}, timeout=30).raise_for_status()
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
    page.goto(server.url, wait_until="domcontentloaded", timeout=60_000)
    _wait(page, f"{STORES}.get('nodeDef').nodeDefsByName['{NODE}'] && {APP}.graph?.nodes?.length > 0",
          "the frontend to register the pack's nodes", 90)
    return page


def _open_help(page) -> int:
    """Put the node on the canvas, select it and click the selection toolbox's info button, as a user does."""
    node_id = page.evaluate(ADD_AND_SELECT)
    info = page.get_by_test_id("info-button")
    info.wait_for(state="visible", timeout=60_000)
    info.click()
    return node_id


def test_node_help_panel_shows_the_packs_page(browser, server, tmp_path):
    page = _page(browser, server, "en")
    try:
        assert not page.get_by_text(DOC_TEXT, exact=False).first.is_visible()
        _open_help(page)
        # What the user sees: the rendered page in the panel, with the input table of web/docs/PainterNetApply.md.
        page.get_by_text(DOC_TEXT, exact=False).first.wait_for(state="visible", timeout=60_000)
        assert page.locator("table", has_text="end_percent").first.is_visible()
        shot = tmp_path / "help.png"
        page.screenshot(path=str(shot))
        if os.environ.get("PAINTERNET_UPDATE_SCREENSHOT") == "1":
            shutil.copyfile(shot, SCREENSHOTS[server.frontend])
    finally:
        page.close()


def test_chinese_locale_shows_translated_node_names(browser, server, request):
    if server.frontend.startswith("pinned"):
        # Frontend 1.32.9 merges /i18n (custom nodes' locales) into its messages when the app mounts, then its
        # Comfy.Locale watcher loads the built-in zh messages with setLocaleMessage, which replaces them
        # (index-*.js: loadLocale -> i18n.global.setLocaleMessage(i, ...)): custom nodes' translations never show
        # there. Strict: this turns red once a pinned frontend keeps them.
        request.applymarker(pytest.mark.xfail(strict=True, raises=AssertionError,
                                              reason="frontend 1.32.9 drops custom node translations when it loads "
                                                     "a non-English locale"))
    page = _page(browser, server, "zh")
    try:
        names = page.evaluate(f"""() => {{
            const defs = {STORES}.get('nodeDef').nodeDefsByName;
            return [defs['{NODE}'].display_name, defs['PainterNetCrop'].display_name, defs['{NODE}'].category];
        }}""")
        assert names == ["应用 PainterNet", "PainterNet 裁剪", "局部重绘/PainterNet"], names
        node_id = _open_help(page)
        assert page.evaluate(f"{APP}.graph.getNodeById({node_id}).title") == "应用 PainterNet"
        # The panel's heading names the node in Chinese; the page itself is the English one (no zh page is shipped).
        page.get_by_text("应用 PainterNet", exact=True).first.wait_for(state="visible", timeout=60_000)
        page.get_by_text(DOC_TEXT, exact=False).first.wait_for(state="visible", timeout=60_000)
    finally:
        page.close()
        requests.post(f"{server.url}/settings", json={"Comfy.Locale": "en"}, timeout=30).raise_for_status()
