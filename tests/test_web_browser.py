"""web/painternet.js in a real browser: headless Chromium drives the ComfyUI frontend served by a real server.

LoadImage and MaskToImage -> SaveImage are loaded as a UI workflow, PainterNetBoxMask is added the way the node
search adds a node and wired in between, a box is dragged with the mouse on the node's editor canvas, the prompt is queued from the page, and the saved mask must hold the box
where it was drawn. Needs Debian's `chromium` at /usr/bin/chromium (`apt-get install chromium`); Playwright drives
it through `executable_path` and never downloads a browser.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from painternet_core import shapes
from harness.server import start_server

pytestmark = [pytest.mark.browser, pytest.mark.server]
logger = logging.getLogger("painternet")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REPO = Path(__file__).resolve().parents[1]
README_SCREENSHOT = REPO / "docs" / "box_mask.png"
IMAGE_NAME = "painternet_browser_test.png"
IMAGE_SIZE = (384, 256)  # (width, height): not square, so a swapped axis shows up
PREFIX = "painternet_box_mask"
# Every wait below waits for an event (a page state, a finished prompt); this only ends a hang, it is no budget.
HANG_GUARD_S = 600.0
BOX_NODE = "PainterNetBoxMask"
BOX_POS, BOX_SIZE = [350, 60], [460, 440]
# The box to drag, in fractions of the editor canvas: (x0, y0) -> (x1, y1).
DRAG = ((0.2, 0.25), (0.7, 0.8))
STROKE = ((0.85, 0.15), (0.85, 0.85))
TOLERANCE_PX = 3
# The four nodes on the page, given the workflow's node positions and its view offset (70, 130) at scale 1.
SCREENSHOT_CLIP = {"x": 80, "y": 132, "width": 1140, "height": 500}

APP = "window.comfyAPI?.app?.app"  # optional: newer frontends define comfyAPI after the page script starts
# The frontend the pinned backend ships with (requirements-dev.txt) and the newest comfyui-frontend-package on PyPI
# when this was written (served with --front-end-root); bump NEWEST when a newer one appears.
FRONTENDS = {"pinned-1.32.9": None, "newest-1.58.1": "1.58.1"}


def _picture(path: str) -> None:
    """A small recognisable picture: a gradient sky, a ground band and a disc."""
    w, h = IMAGE_SIZE
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0] = 60 + (x * 120 // w)
    rgb[..., 1] = 110 + (y * 100 // h)
    rgb[..., 2] = 200
    rgb[y > h * 0.7] = (70, 140, 60)
    disc = (x - w * 0.45) ** 2 + (y - h * 0.5) ** 2 < (h * 0.22) ** 2
    rgb[disc] = (230, 190, 40)
    Image.fromarray(rgb).save(path)


def _workflow(image_name: str = IMAGE_NAME) -> dict[str, Any]:
    """UI-format workflow (what the browser saves) around the spot where the test adds the PainterNet editor node:
    Load Image (of `image_name`), and Mask To Image feeding Save Image."""
    def node(node_id: int, kind: str, pos: list[int], size: list[int], inputs: list[dict], outputs: list[dict],
             widgets: list[Any]) -> dict[str, Any]:
        return {"id": node_id, "type": kind, "pos": pos, "size": size, "flags": {}, "order": node_id - 1, "mode": 0,
                "inputs": inputs, "outputs": outputs, "properties": {}, "widgets_values": widgets}

    return {
        "last_node_id": 4, "last_link_id": 3, "version": 0.4, "groups": [], "config": {},
        "extra": {"ds": {"scale": 1.0, "offset": [70, 130]}},
        "nodes": [
            node(1, "LoadImage", [20, 60], [300, 360], [],
                 [{"name": "IMAGE", "type": "IMAGE", "links": None}, {"name": "MASK", "type": "MASK", "links": None}],
                 [image_name, "image"]),
            node(3, "MaskToImage", [840, 60], [220, 60], [{"name": "mask", "type": "MASK", "link": None}],
                 [{"name": "IMAGE", "type": "IMAGE", "links": [3]}], []),
            node(4, "SaveImage", [840, 180], [300, 300], [{"name": "images", "type": "IMAGE", "link": 3}], [],
                 [PREFIX]),
        ],
        "links": [[3, 3, 0, 4, 0, "IMAGE"]],
    }


# Adds the editor node the way the node search does (LiteGraph.createNode + graph.add) and wires it in.
ADD_BOX_NODE = f"""() => {{
    const app = {APP};
    const node = LiteGraph.createNode("{BOX_NODE}");
    node.pos = {BOX_POS};
    app.graph.add(node);
    node.size = {BOX_SIZE};
    app.graph.getNodeById(1).connect(0, node, 0);
    node.connect(0, app.graph.getNodeById(3), 0);
    app.graph.setDirtyCanvas(true, true);
    return node.id;
}}"""


@pytest.fixture(scope="module")
def browser():
    # .ci/run sets PAINTERNET_REQUIRE_BROWSER=1: in CI a missing browser is a failure, never a silent skip.
    required = os.environ.get("PAINTERNET_REQUIRE_BROWSER") == "1"
    if not os.path.isfile(CHROMIUM):
        (pytest.fail if required else pytest.skip)(
            f"no Chromium at {CHROMIUM}: install Debian's `chromium` package (apt-get install -y chromium) to run "
            "the browser test; Playwright never downloads one here")
    if required:
        import playwright.sync_api as sync_api
    else:
        sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright python package is not installed")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _frontend_root(version: str) -> str:
    """The static folder of comfyui-frontend-package==`version`, fetched once from PyPI with pip into .cache (a wheel
    is a zip; nothing of it is installed, so the pinned frontend the backend imports stays as it is)."""
    import subprocess
    import sys
    import zipfile

    root = REPO / ".cache" / "frontends" / version
    static = root / "comfyui_frontend_package" / "static"
    if (static / "index.html").is_file():
        return str(static)
    wheels = REPO / ".cache" / "frontends" / "wheels"
    result = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels),
                             f"comfyui-frontend-package=={version}"], capture_output=True, text=True, timeout=600)
    found = sorted(wheels.glob(f"comfyui_frontend_package-{version}-*.whl"))
    if result.returncode != 0 or not found:
        message = f"could not fetch comfyui-frontend-package=={version} from PyPI: {result.stderr[-500:]}"
        (pytest.fail if os.environ.get("PAINTERNET_REQUIRE_BROWSER") == "1" else pytest.skip)(message)
    tmp = root.with_name(version + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(found[0]) as wheel:
        wheel.extractall(tmp)
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return str(static)


@pytest.fixture(scope="module", params=list(FRONTENDS))
def server(request, tmp_path_factory):
    version = FRONTENDS[request.param]
    extra = () if version is None else ("--front-end-root", _frontend_root(version))
    srv = start_server(str(tmp_path_factory.mktemp("comfy_web")), extra_args=extra)
    _picture(os.path.join(srv.input_dir, IMAGE_NAME))
    # A fresh user folder counts as a new user: skip the first-run templates dialog that would cover the graph, and
    # the minimap that would cover part of it in the screenshot.
    requests.post(f"{srv.url}/settings", json={"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False},
                  timeout=30).raise_for_status()
    srv.frontend = request.param
    yield srv
    srv.stop()


def _wait(page, expression: str, what: str, timeout_s: float = HANG_GUARD_S) -> Any:
    """Poll a JS expression until it is truthy (an event, not a time budget: `timeout_s` only guards against a
    hang); fails with `what` and the page's console on timeout."""
    # Evaluated inside try/catch: while a newer frontend starts, its getters can throw (a store not ready yet).
    # Objects come back as `true`: a frontend object graph is not serialisable.
    guarded = (f"(() => {{ try {{ const v = ({expression}); return [true, v && typeof v === 'object' ? true : v]; }} "
               "catch (e) { return [false, String(e)]; } })()")
    deadline = time.monotonic() + timeout_s
    last_error = None
    while time.monotonic() < deadline:
        ok, value = page.evaluate(guarded)
        if ok and value:
            return value
        last_error = None if ok else value
        page.wait_for_timeout(100)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} ({expression}); last error: {last_error}")


@pytest.mark.parametrize("vue_nodes", [False, True], ids=["litegraph-nodes", "nodes-2.0"])
def test_drag_a_box_in_the_browser_and_get_it_in_the_saved_mask(browser, server, vue_nodes, tmp_path):
    # `browser` first: without Chromium the test skips before a server is started for nothing.
    # "Nodes 2.0" (Vue-rendered nodes) is a user setting; set before the page loads so the graph starts in that mode.
    requests.post(f"{server.url}/settings", json={"Comfy.VueNodes.Enabled": vue_nodes},
                  timeout=30).raise_for_status()
    for stale in glob.glob(os.path.join(server.output_dir, f"{PREFIX}_*.png")):
        os.remove(stale)  # the server is shared by the parametrised runs: only this run's output counts
    # The same picture under a name of this run's own: the server is shared by both rendering modes, and an
    # unchanged prompt would be answered from ComfyUI's cache, without running the editor node or saving a file.
    image_name = f"{'vue' if vue_nodes else 'canvas'}_{IMAGE_NAME}"
    _picture(os.path.join(server.input_dir, image_name))
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    console: list[str] = []
    page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
    page.on("pageerror", lambda exc: console.append(f"pageerror: {exc}"))
    # The "Nodes 2.0" banner remembers its dismissal in localStorage; dismissed, it stays out of the screenshot.
    page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
    try:
        page.goto(server.url, wait_until="domcontentloaded", timeout=HANG_GUARD_S * 1000)
        _wait(page, f"{APP}?.extensions?.some(e => e.name === 'PainterNet.Web')", "the PainterNet.Web extension")
        # Start-up is over once the node types are registered and the initial workflow is on the canvas; loading
        # ours earlier would be replaced by it.
        _wait(page, f"window.LiteGraph?.registered_node_types?.{BOX_NODE} && {APP}.graph?.nodes?.length > 0",
              "the frontend to finish start-up")
        page.evaluate(f"async (wf) => {{ await {APP}.loadGraphData(wf, true, true, 'painternet-box-mask'); }}",
                      _workflow(image_name))
        box_id = page.evaluate(ADD_BOX_NODE)
        node = f"{APP}.graph.getNodeById({box_id})"
        _wait(page, f"{node}?.painternetEditor", "the editor widget on PainterNetBoxMask")
        # Before any run the editor shows the image the Load Image node displays.
        _wait(page, f"{node}.painternetEditor.imageSource === 'upstream'", "the Load Image picture in the editor")
        canvas = page.locator("canvas.painternet-editor-canvas")
        canvas.wait_for(state="visible", timeout=HANG_GUARD_S * 1000)
        box = _settled_box(page, canvas)
        assert box and box["width"] > 50 and box["height"] > 50, box
        aspect = box["width"] / box["height"]
        assert abs(aspect - IMAGE_SIZE[0] / IMAGE_SIZE[1]) < 0.02, f"editor canvas {box} lost the image's aspect"

        (fx0, fy0), (fx1, fy1) = DRAG
        _drag(page, box, DRAG, steps=8)
        stored = _shapes(page, node)
        assert [s["type"] for s in stored["shapes"]] == ["box"], stored
        drawn = stored["shapes"][0]
        for got, want in [(drawn["x"], fx0), (drawn["y"], fy0), (drawn["w"], fx1 - fx0), (drawn["h"], fy1 - fy0)]:
            assert abs(got - want) < 0.01, (drawn, DRAG)

        # Brush mode: a vertical stroke right of the box, at the default brush width.
        editor = page.locator(".painternet-editor")
        editor.locator("button", has_text="Brush").click()
        _drag(page, box, STROKE, steps=10)
        # A stray box, then Undo: only the stray one goes.
        editor.locator("button", has_text="Box").click()
        _drag(page, box, ((0.05, 0.05), (0.12, 0.15)), steps=3)
        assert len(_shapes(page, node)["shapes"]) == 3
        editor.locator("button", has_text="Undo").click()
        stored = _shapes(page, node)
        assert [s["type"] for s in stored["shapes"]] == ["box", "stroke"], stored
        stroke = stored["shapes"][1]
        assert stroke["width"] == pytest.approx(0.05) and len(stroke["points"]) >= 2, stroke
        # The drawing is part of the saved workflow, not only of the prompt.
        saved = page.evaluate(f"{APP}.graph.serialize().nodes.find(n => n.id === {box_id}).widgets_values[0]")
        assert json.loads(saved) == stored

        known = set(requests.get(f"{server.url}/history", timeout=30).json())
        page.evaluate(f"async () => {{ await {APP}.queuePrompt(0); }}")
        outputs = _wait_for_output(server, known)
        _wait(page, f"{node}.painternetEditor.imageSource === 'run'", "the run's preview in the editor")
        page.evaluate(f"{APP}.canvas.deselectAll()")
        page.mouse.move(5, 790)
        page.wait_for_timeout(300)

        page.screenshot(path=str(tmp_path / "page.png"))
        shot = tmp_path / "box_mask.png"
        page.screenshot(path=str(shot), clip=SCREENSHOT_CLIP)
        if (os.environ.get("PAINTERNET_UPDATE_SCREENSHOT") == "1" and server.frontend.startswith("pinned")
                and not vue_nodes):  # a test run never dirties the checkout
            shutil.copyfile(shot, README_SCREENSHOT)
    except Exception:
        page.screenshot(path=str(tmp_path / "failure.png"))
        logger.error("browser console:\n%s", "\n".join(console[-60:]))  # pytest shows captured logs on failure
        raise
    finally:
        page.close()

    assert not [line for line in console if line.startswith("pageerror")], console
    with Image.open(outputs[0]) as img:
        saved_mask = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    width, height = IMAGE_SIZE
    assert saved_mask.shape == (height, width)
    # What the server saved is exactly the core's rendering of what the browser stored...
    np.testing.assert_array_equal(saved_mask > 0.5, shapes.render_mask(json.dumps(stored), height, width) > 0.5)
    # ...and the box is where the mouse dragged it: a filled rectangle, bounds within a few pixels.
    left_part = saved_mask[:, : int(STROKE[0][0] * width) - 20] > 0.5
    rows = np.flatnonzero(left_part.any(axis=1))
    cols = np.flatnonzero(left_part.any(axis=0))
    assert rows.size and cols.size, "the saved mask has no box"
    assert abs(rows[0] - fy0 * height) <= TOLERANCE_PX and abs(rows[-1] + 1 - fy1 * height) <= TOLERANCE_PX
    assert abs(cols[0] - fx0 * width) <= TOLERANCE_PX and abs(cols[-1] + 1 - fx1 * width) <= TOLERANCE_PX
    assert left_part[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
    assert left_part.sum() == rows.size * cols.size
    # The stroke: a band around x = 0.85 W from about 0.15 H to 0.85 H.
    column = int(STROKE[0][0] * width)
    band = column - 20 + np.flatnonzero(saved_mask[height // 2, column - 20:] > 0.5)
    assert column in band and abs(band.size - 0.05 * height) <= 2, band  # brush 5 % of the short side
    assert saved_mask[int(0.2 * height):int(0.8 * height), column].min() > 0.5


def _settled_box(page, locator) -> dict[str, float] | None:
    """The locator's bounding box once the widget has settled at its final size (two reads 100 ms apart agree)."""
    deadline = time.monotonic() + HANG_GUARD_S
    box = locator.bounding_box()
    while time.monotonic() < deadline:
        page.wait_for_timeout(100)
        again = locator.bounding_box()
        if again == box:
            return box
        box = again
    raise AssertionError(f"the editor canvas never settled (last box {box})")


def _drag(page, box: dict[str, float], points: tuple[tuple[float, float], tuple[float, float]], steps: int) -> None:
    """Press at points[0], move to points[1] and release; points are fractions of the canvas' bounding box."""
    (x0, y0), (x1, y1) = points
    page.mouse.move(box["x"] + x0 * box["width"], box["y"] + y0 * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + x1 * box["width"], box["y"] + y1 * box["height"], steps=steps)
    page.mouse.up()


def _shapes(page, node: str) -> dict[str, Any]:
    return json.loads(page.evaluate(f"{node}.widgets.find(w => w.name === 'shapes').value"))


def _wait_for_output(server, known: set[str], timeout_s: float = HANG_GUARD_S) -> list[str]:
    """The files our SaveImage wrote for the first prompt that finishes after `known` (ids already in /history), as
    ComfyUI's history reports them: it records a prompt once its outputs are written, so the files are complete.
    Waits for that event; `timeout_s` only guards against a hang."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for prompt_id, entry in requests.get(f"{server.url}/history", timeout=30).json().items():
            if prompt_id in known:
                continue
            status = entry.get("status", {})
            if status.get("status_str") == "error":
                raise AssertionError(f"the browser's prompt failed: {status.get('messages')}")
            if status.get("completed"):
                return sorted(os.path.join(server.output_dir, image["subfolder"], image["filename"])
                              for output in entry["outputs"].values() for image in output.get("images", [])
                              if image["filename"].startswith(PREFIX) and image.get("type") == "output")
        time.sleep(0.2)
    raise AssertionError(f"no finished prompt after {timeout_s}s; server log tail:\n{server.log()[-3000:]}")