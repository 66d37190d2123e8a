"""web/painternet.js given a shared workflow whose `shapes` widget holds malformed shapes (issue 12, finding 10):
the workflow must load, the editor must show the well-formed shapes and warn about the others on the console, and
nothing may throw (an exception during load stops the frontend with an error dialog). Same Chromium set-up as
test_web_browser.py."""
from __future__ import annotations

import json
from typing import Any

import pytest

from test_web_browser import APP, BOX_NODE, _wait, browser, server  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.browser, pytest.mark.server]

MALFORMED = json.dumps({"version": 1, "shapes": [
    {"type": "stroke", "width": 0.1, "points": [None]},
    {"type": "stroke", "width": 0.1, "points": [[0, 0], 5]},
    {"type": "stroke", "width": 0.1, "points": {}},
    {"type": "box", "x": "a", "y": 0, "w": 1, "h": 1},
    None,
    {"type": "box", "x": 0.1, "y": 0.2, "w": 0.3, "h": 0.4},
]})


def _workflow(shapes_text: str) -> dict[str, Any]:
    return {
        "last_node_id": 1, "last_link_id": 0, "version": 0.4, "groups": [], "config": {},
        "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}},
        "nodes": [{"id": 1, "type": BOX_NODE, "pos": [60, 60], "size": [420, 420], "flags": {}, "order": 0,
                   "mode": 0, "inputs": [{"name": "image", "type": "IMAGE", "link": None}],
                   "outputs": [{"name": "mask", "type": "MASK", "links": None}], "properties": {},
                   "widgets_values": [shapes_text, False]}],
        "links": [],
    }


def test_malformed_shapes_in_a_shared_workflow_are_skipped_with_a_warning(browser, server):  # noqa: F811
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    console: list[str] = []
    page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
    page.on("pageerror", lambda exc: console.append(f"pageerror: {exc}"))
    page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
    try:
        page.goto(server.url, wait_until="domcontentloaded", timeout=60_000)
        _wait(page, f"{APP}?.extensions?.some(e => e.name === 'PainterNet.Web')", "the PainterNet.Web extension", 60)
        _wait(page, f"window.LiteGraph?.registered_node_types?.{BOX_NODE} && {APP}.graph?.nodes?.length > 0",
              "the frontend to finish start-up", 60)
        for text in (MALFORMED, '{"version": 1, "shapes": 5}', "[[["):
            page.evaluate(f"async (wf) => {{ await {APP}.loadGraphData(wf, true, true, 'painternet-untrusted'); }}",
                          _workflow(text))
            node = f"{APP}.graph.getNodeById(1)"
            _wait(page, f"{node}?.painternetEditor", "the editor widget on the loaded PainterNetBoxMask")
            page.wait_for_timeout(300)  # let the editor draw once
            drawn = page.evaluate(f"{node}.painternetEditor.shapes")
            assert drawn == ([{"type": "box", "x": 0.1, "y": 0.2, "w": 0.3, "h": 0.4}] if text == MALFORMED
                             else []), drawn
    finally:
        page.close()
    assert not [line for line in console if line.startswith("pageerror")], console
    warnings = [line for line in console if line.startswith("warning:") and "PainterNet.Web" in line]
    assert any("ignored 5 malformed shape(s) of 6" in line for line in warnings), console
    assert any("no shape list" in line for line in warnings), console
    assert any("invalid JSON" in line for line in warnings), console
