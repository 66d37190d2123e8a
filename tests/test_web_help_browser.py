"""The node-help panel and the Chinese locale in a real browser, on the frontend ComfyUI 0.3.75 pins and the newest
one (the servers and browser of tests/test_web_browser.py): the panel of Apply PainterNet opens from the node library
and shows the pack's web/docs page (pinned frontend), and with the UI language set to Chinese the node's name is the
translated one (newest frontend; 1.32.9 drops custom-node translations, a strict known failure).
The English panel is saved as docs/node_help_panel.png when PAINTERNET_UPDATE_SCREENSHOT=1 (pinned frontend)."""
from __future__ import annotations

import os
import shutil

import pytest
import requests

from conftest import REPO
from test_web_browser import APP, _wait, browser, server  # noqa: F401  (fixtures shared with the editor test)

pytestmark = [pytest.mark.server, pytest.mark.browser]

NODE = "PainterNetApply"
SCREENSHOT = os.path.join(REPO, "docs", "node_help_panel.png")
# The app's Pinia stores, as the selection toolbox's "?" uses them (sidebarTab + nodeHelp + nodeDef).
STORES = "document.getElementById('vue-app').__vue_app__.config.globalProperties.$pinia._s"
# Stores are created on first use: the node library's tab creates the help store (newer frontends), then help opens.
OPEN_LIBRARY = f"""() => {{
    const sidebar = {STORES}.get('sidebarTab');
    if (sidebar.activeSidebarTabId !== 'node-library') sidebar.toggleSidebarTab('node-library');
}}"""
OPEN_HELP = f"() => {STORES}.get('nodeHelp').openHelp({STORES}.get('nodeDef').nodeDefsByName['{NODE}'])"


def _page(browser, server, locale: str):
    requests.post(f"{server.url}/settings", json={"Comfy.Locale": locale}, timeout=30).raise_for_status()
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
    page.goto(server.url, wait_until="domcontentloaded", timeout=60_000)
    _wait(page, f"{STORES}.get('nodeDef').nodeDefsByName['{NODE}'] && {APP}.graph?.nodes?.length > 0",
          "the frontend to register the pack's nodes", 90)
    return page


def test_node_help_panel_shows_the_packs_page(browser, server, tmp_path):
    if not server.frontend.startswith("pinned"):
        # 1.58.1 fetches the same /extensions/<pack>/docs/<node>.md (checked by test_workflows_server), but its node
        # library creates the help store elsewhere; driving its panel is not automated yet.
        pytest.skip("opening the node-help panel is automated for the pinned frontend only")
    page = _page(browser, server, "en")
    try:
        page.evaluate(OPEN_LIBRARY)
        _wait(page, f"{STORES}.get('nodeHelp')", "the node library's help store", 30)
        page.evaluate(OPEN_HELP)
        _wait(page, "document.body.innerText.includes('preservation scale')", "the help page from web/docs", 60)
        # What the user sees: the rendered page in the sidebar, with the input table of web/docs/PainterNetApply.md.
        page.get_by_text("Write the", exact=False).first.wait_for(state="visible", timeout=30_000)
        assert page.get_by_text("end_percent", exact=False).first.is_visible()
        shot = tmp_path / "help.png"
        page.screenshot(path=str(shot))
        if os.environ.get("PAINTERNET_UPDATE_SCREENSHOT") == "1" and server.frontend.startswith("pinned"):
            shutil.copyfile(shot, SCREENSHOT)
    finally:
        page.close()


def test_chinese_locale_shows_translated_node_names(browser, server, request):
    if server.frontend.startswith("pinned"):
        # Frontend 1.32.9 merges /i18n into its messages at start-up, then loads a non-English locale lazily with
        # setLocaleMessage, which replaces them (index-*.js: loadLocale -> i18n.global.setLocaleMessage(i, ...)):
        # custom nodes' translations never show there. Strict: this turns red once a pinned frontend keeps them.
        request.applymarker(pytest.mark.xfail(strict=True, reason="frontend 1.32.9 drops custom node translations "
                                                                  "when it loads a non-English locale"))
    page = _page(browser, server, "zh")
    try:
        names = page.evaluate(f"""() => {{
            const defs = {STORES}.get('nodeDef').nodeDefsByName;
            return [defs['{NODE}'].display_name, defs['PainterNetCrop'].display_name, defs['{NODE}'].category];
        }}""")
        assert names == ["应用 PainterNet", "PainterNet 裁剪", "局部重绘/PainterNet"], names
    finally:
        page.close()
        requests.post(f"{server.url}/settings", json={"Comfy.Locale": "en"}, timeout=30).raise_for_status()
