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
            drawn = page.evaluate(f"{node}.painternetEditor.shapes")  # what the editor paints, parsed from the widget
            assert drawn == ([{"type": "box", "x": 0.1, "y": 0.2, "w": 0.3, "h": 0.4}] if text == MALFORMED
                             else []), drawn
    finally:
        page.close()
    assert not [line for line in console if line.startswith("pageerror")], console
    warnings = [line for line in console if line.startswith("warning:") and "PainterNet.Web" in line]
    assert any("ignored 5 malformed shape(s) of 6" in line for line in warnings), console
    assert any("no shape list" in line for line in warnings), console
    assert any("invalid JSON" in line for line in warnings), console


def _open_editor(browser, server, console: list[str]):  # noqa: F811
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
    page.on("pageerror", lambda exc: console.append(f"pageerror: {exc}"))
    page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
    page.goto(server.url, wait_until="domcontentloaded", timeout=60_000)
    _wait(page, f"{APP}?.extensions?.some(e => e.name === 'PainterNet.Web')", "the PainterNet.Web extension", 60)
    _wait(page, f"window.LiteGraph?.registered_node_types?.{BOX_NODE} && {APP}.graph?.nodes?.length > 0",
          "the frontend to finish start-up", 60)
    return page


def _load(page, text: str) -> str:
    page.evaluate(f"async (wf) => {{ await {APP}.loadGraphData(wf, true, true, 'painternet-untrusted'); }}",
                  _workflow(text))
    node = f"{APP}.graph.getNodeById(1)"
    _wait(page, f"{node}?.painternetEditor", "the editor widget on the loaded PainterNetBoxMask")
    page.evaluate(f"{node}.painternetEditor.shapes.length")  # the first read parses the loaded value, as a draw would
    return f"{node}.painternetEditor"


def test_redraws_parse_the_shapes_once_per_change_and_the_editor_keeps_the_backend_cap(browser, server):  # noqa: F811
    """A 1 MiB drawing (60 000 stroke points): redraws, as each pointer move makes, parse nothing until the value
    changes; a document above the backend's 4 MiB is neither shown nor written."""
    console: list[str] = []
    page = _open_editor(browser, server, console)
    stroke = {"type": "stroke", "width": 0.05, "points": [[round(i / 60000, 5), 0.5] for i in range(60000)]}
    try:
        editor = _load(page, json.dumps({"version": 1, "shapes": [stroke]}))
        parses = page.evaluate(f"""() => {{
            const editor = {editor}, parse = JSON.parse;
            let count = 0;
            JSON.parse = (...args) => {{ count += 1; return parse(...args); }};
            try {{
                for (let i = 0; i < 5; i++) editor.draw();
                const quiet = count;
                editor.commit([...editor.shapes, {{type: "box", x: 0.1, y: 0.1, w: 0.2, h: 0.2}}]);
                for (let i = 0; i < 5; i++) editor.draw();
                return [quiet, count, editor.shapes.length];
            }} finally {{ JSON.parse = parse; }}
        }}""")
        assert parses == [0, 1, 2], parses  # no parse per redraw; one after the change
        box = {"type": "box", "x": 0.1, "y": 0.2, "w": 0.3, "h": 0.4}
        oversized = json.dumps({"version": 1, "shapes": [box]}) + " " * (4 * 2**20)
        editor = _load(page, oversized)
        assert page.evaluate(f"{editor}.shapes") == []
        assert any("more than the 4194304 the backend accepts" in line for line in console), console[-3:]
        editor = _load(page, json.dumps({"version": 1, "shapes": [box]}))
        boxes = [dict(box, x=round(i / 90000, 5)) for i in range(90000)]  # ~4.6 MB once written (> 4 MiB)
        written = page.evaluate(f"(boxes) => {{ const e = {editor}; e.commit(boxes); "
                                "return [e.shapesWidget.value.length, e.status.textContent]; }", boxes)
        assert written[0] < 200 and "size limit reached" in written[1], written
    finally:
        page.close()
    assert not [line for line in console if line.startswith("pageerror")], console
