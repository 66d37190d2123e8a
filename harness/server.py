"""A real ComfyUI `main.py --cpu` server with the pack linked into a custom_nodes folder given through
`--extra-model-paths-config`, for tests that go through `POST /prompt` like a user's browser does."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import requests

from harness import COMFYUI_PATH, REPO

PACK_NAME = "ComfyUI-PainterNet"
# Nodes that inject a branch; `branch_off` sets their scale to 0.
BRANCH_APPLY_NODES = ("PainterNetApply", "PowerPaintApply")
# Mean |difference| over the hole, in 8-bit levels, between a graph with its branch on (scale >= 0.5) and the same
# graph at scale 0 (same seed), below which the branch is taken to have done nothing (then it is exactly 0 on a CPU).
# Measured on the soak's 64x48 graph with the test weights (2 steps, scale 1): 7.5 in the hole.
BRANCH_HOLE_MARGIN = 2.0
# Without a stitch the picture is the VAE decode of the sampled latent: the latent outside the hole is kept as encoded
# (ComfyUI's noise mask), so there the two latents are equal, while the decoder spreads the hole's change around it
# (the test TAESD is random, its reach spans a 64 px picture). Latent cells farther than this from the hole compare
# equal; decoded pixels farther than DECODE_BAND px compare within the VAE round trip's own error on the picture.
LATENT_BAND_CELLS = 1
DECODE_BAND = 8
# Widget kinds of /object_info inputs that a UI workflow stores in `widgets_values`.
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# The nodes `add_branch_checks` adds (ids far above the builders' own).
CHECK_NODES = {"mask": "61", "latent": "62", "source": "63", "round_trip": "66"}
# A fixed mmap threshold turns off glibc's dynamic one, under which freed checkpoint buffers can stay in the heap as
# a one-off RSS plateau (measured once: +206 MiB after a swap back, +18 MiB on the identical rerun): with it, RSS
# follows live memory, so the soak's margin measures leaks, not allocator timing.
SERVER_ENV = {"PYTHONUNBUFFERED": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ComfyServer:
    base: str
    port: int
    process: subprocess.Popen
    log_path: str
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def models(self, kind: str) -> str:
        path = os.path.join(self.base, "models", kind)
        os.makedirs(path, exist_ok=True)
        return path

    @property
    def input_dir(self) -> str:
        return os.path.join(self.base, "input")

    @property
    def output_dir(self) -> str:
        return os.path.join(self.base, "output")

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def object_info(self) -> dict[str, Any]:
        return requests.get(f"{self.url}/object_info", timeout=60).json()

    def queue(self, prompt: dict[str, Any]) -> str:
        """POST /prompt; returns the prompt id. A validation failure raises with the server's JSON error."""
        r = requests.post(f"{self.url}/prompt", json={"prompt": prompt, "client_id": self.client_id}, timeout=60)
        if r.status_code != 200:
            raise RuntimeError(f"/prompt refused ({r.status_code}): {r.text}")
        return r.json()["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict[str, Any]:
        """Poll /history until the prompt finished (successfully or not); returns its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI server died (exit {self.process.returncode}):\n{self.log()[-4000:]}")
            r = requests.get(f"{self.url}/history/{prompt_id}", timeout=30)
            entry = r.json().get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"].get("status_str") in ("success", "error")):
                return entry
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.log()[-4000:]}")

    def run(self, prompt: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
        return self.wait(self.queue(prompt), timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def error_text(entry: dict[str, Any]) -> str:
    """The exception message ComfyUI recorded for a failed prompt ('' when it succeeded)."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return f"{data.get('exception_type')}: {data.get('exception_message')}"
    return ""


def start_server(base: str, timeout: float = 300.0, cpu: bool = True,
                 extra_args: tuple[str, ...] = ()) -> ComfyServer:
    """Start ComfyUI with its own base folder (models, input, output, user) and the pack linked in; `cpu=False`
    lets it pick the accelerator (benchmarks on a GPU machine); `extra_args` go to main.py (e.g. --front-end-root)."""
    for sub in ("custom_nodes", "input", "output", "temp", "user", "models/checkpoints", "models/painternet"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    link = os.path.join(base, "custom_nodes", PACK_NAME)
    if not os.path.islink(link):
        os.symlink(REPO, link)
    config = os.path.join(base, "extra_model_paths.yaml")
    with open(config, "w", encoding="utf-8") as fh:
        fh.write(f"painternet_tests:\n  base_path: {base}\n  checkpoints: models/checkpoints\n"
                 f"  painternet: models/painternet\n  vae: models/vae\n  custom_nodes: custom_nodes\n"
                 f"  inpaint: models/inpaint\n  text_encoders: models/text_encoders\n")
    port = _free_port()
    log_path = os.path.join(base, "server.log")
    cmd = [sys.executable, os.path.join(COMFYUI_PATH, "main.py"), *(["--cpu"] if cpu else []), "--listen",
           "127.0.0.1", "--port", str(port), "--extra-model-paths-config", config, "--input-directory",
           os.path.join(base, "input"), "--output-directory", os.path.join(base, "output"), "--temp-directory",
           os.path.join(base, "temp"), "--user-directory", os.path.join(base, "user"), "--database-url",
           "sqlite:///:memory:", "--disable-auto-launch", "--disable-api-nodes", *extra_args]
    env = dict(os.environ, **SERVER_ENV)
    log = open(log_path, "w", encoding="utf-8")
    process = subprocess.Popen(cmd, cwd=COMFYUI_PATH, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ComfyServer(base, port, process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ComfyUI exited at start-up ({process.returncode}):\n{server.log()[-4000:]}")
        try:
            if requests.get(f"{server.url}/system_stats", timeout=5).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    else:
        server.stop()
        raise TimeoutError(f"ComfyUI did not answer in {timeout}s:\n{server.log()[-4000:]}")
    info = server.object_info()
    if "PainterNetApply" not in info:
        server.stop()
        raise RuntimeError(f"the pack's nodes are missing from /object_info:\n{server.log()[-4000:]}")
    return server


def start_sd15_server(base: str) -> ComfyServer:
    """:func:`start_server` with the tiny SD15 test checkpoint and branch (``harness.models``) linked in as
    ``tiny-sd15.safetensors`` and ``tiny-sd15-branch.safetensors``, the names the test graphs load."""
    from harness.models import branch_file, sd15_checkpoint

    server = start_server(base)
    os.symlink(sd15_checkpoint(), os.path.join(server.models("checkpoints"), "tiny-sd15.safetensors"))
    os.symlink(branch_file("sd15", "tiny-sd15-320-branch.safetensors"),
               os.path.join(server.models("painternet"), "tiny-sd15-branch.safetensors"))
    return server


def saved_pixels(server: ComfyServer, entry: dict[str, Any], node: str, index: int = 0) -> np.ndarray:
    """The `index`-th picture a SaveImage node `node` wrote for a finished prompt, as (H, W, 3) uint8 RGB."""
    from PIL import Image

    item = entry["outputs"][node]["images"][index]
    with Image.open(os.path.join(server.output_dir, item["subfolder"], item["filename"])) as im:
        return np.asarray(im.convert("RGB"))


def branch_off(prompt: dict[str, Any], suffix: str = "-off") -> dict[str, Any]:
    """The same API prompt with the branch switched off: every branch apply node at scale 0 (the graph is otherwise
    identical, same seeds), and each saving node's prefix given `suffix` so the two runs write different files."""
    off = json.loads(json.dumps(prompt))
    applies = [node for node in off.values() if node["class_type"] in BRANCH_APPLY_NODES]
    if not applies:
        raise ValueError(f"the prompt has none of the apply nodes {BRANCH_APPLY_NODES}")
    for node in applies:
        node["inputs"]["scale"] = 0.0
    for node in off.values():
        if "filename_prefix" in node["inputs"]:
            node["inputs"]["filename_prefix"] += suffix
    return off


def add_branch_checks(nodes: dict[str, Any], image: list, mask: list, samples: list, vae: list, prefix: str) -> None:
    """Save what comparing a graph without stitch with its `branch_off` twin needs: the mask Apply gets, the sampled
    latent, the picture Apply gets and its VAE round trip (nodes CHECK_NODES)."""
    nodes.update({
        "60": {"class_type": "MaskToImage", "inputs": {"mask": mask}},
        "61": {"class_type": "SaveImage", "inputs": {"images": ["60", 0], "filename_prefix": prefix + "-mask"}},
        "62": {"class_type": "SaveLatent", "inputs": {"samples": samples, "filename_prefix": prefix + "-latent"}},
        "63": {"class_type": "SaveImage", "inputs": {"images": image, "filename_prefix": prefix + "-source"}},
        "64": {"class_type": "VAEEncode", "inputs": {"pixels": image, "vae": vae}},
        "65": {"class_type": "VAEDecode", "inputs": {"samples": ["64", 0], "vae": vae}},
        "66": {"class_type": "SaveImage", "inputs": {"images": ["65", 0], "filename_prefix": prefix + "-round-trip"}},
    })


def saved_latent(server: ComfyServer, entry: dict[str, Any], node: str) -> np.ndarray:
    """The latent a SaveLatent node `node` wrote for a finished prompt."""
    from safetensors.numpy import load_file

    item = entry["outputs"][node]["latents"][0]
    return load_file(os.path.join(server.output_dir, item["subfolder"], item["filename"]))["latent_tensor"]


def saved_hole(server: ComfyServer, entry: dict[str, Any]) -> np.ndarray:
    """The hole (bool H×W) of a prompt built with `add_branch_checks`."""
    return saved_pixels(server, entry, CHECK_NODES["mask"])[..., 0] > 127


def outside(hole: np.ndarray, band: int) -> np.ndarray:
    """Pixels farther than `band` px (square neighbourhood) from the hole."""
    import cv2

    return cv2.dilate(hole.astype(np.uint8), np.ones((2 * band + 1, 2 * band + 1), np.uint8)) == 0


def branch_problems(on: np.ndarray, off: np.ndarray, hole: np.ndarray, keep: np.ndarray,
                    outside_tolerance: float) -> list[str]:
    """What is wrong with a pair of decoded pictures of one graph with the branch on and off (scale 0): the hole must
    differ by BRANCH_HOLE_MARGIN (mean |difference| in 8-bit levels), the `keep` pixels (outside hole + band) by at
    most `outside_tolerance` levels (0 with stitch: equal). Empty = the branch visibly acted, and only in the hole."""
    if on.shape != off.shape or not hole.any() or not keep.any():
        return [f"shapes {on.shape}/{off.shape}, {int(hole.sum())} hole and {int(keep.sum())} kept pixels"]
    diff = np.abs(on.astype(np.float32) - off.astype(np.float32)).mean(-1)
    problems = []
    if diff[hole].mean() < BRANCH_HOLE_MARGIN:
        problems.append(f"the branch changes the hole by {diff[hole].mean():.2f} levels on average, under the "
                        f"{BRANCH_HOLE_MARGIN} margin: it did not act")
    if diff[keep].max() > outside_tolerance:
        problems.append(f"the branch changes pixels outside the hole and its band by up to {diff[keep].max():.2f} "
                        f"levels (allowed {outside_tolerance})")
    return problems


def decoded_branch_problems(server: ComfyServer, on: dict[str, Any], off: dict[str, Any],
                            picture: str = "9") -> list[str]:
    """`branch_problems` for a graph without stitch and its `branch_off` twin, both built with `add_branch_checks`
    (`picture`: the SaveImage node of the decoded result): the hole differs by the margin, the sampled latents are
    equal farther than LATENT_BAND_CELLS from the hole, and the decoded pixels farther than DECODE_BAND px differ by
    no more than the VAE round trip changes the picture there."""
    hole = saved_hole(server, on)
    source = saved_pixels(server, on, CHECK_NODES["source"]).astype(np.float32)
    round_trip = saved_pixels(server, on, CHECK_NODES["round_trip"]).astype(np.float32)
    keep = outside(hole, DECODE_BAND)
    tolerance = float(np.abs(round_trip - source).mean(-1)[keep].max()) if keep.any() else 0.0
    problems = branch_problems(saved_pixels(server, on, picture), saved_pixels(server, off, picture), hole, keep,
                               tolerance)
    latent_on, latent_off = saved_latent(server, on, CHECK_NODES["latent"]), saved_latent(server, off,
                                                                                      CHECK_NODES["latent"])
    cells = latent_on.shape[-2:]
    # A latent cell is near the hole when its 8x8 pixels, grown by LATENT_BAND_CELLS cells, touch it.
    hole_cells = hole[: cells[0] * 8, : cells[1] * 8].reshape(cells[0], 8, cells[1], 8).any(axis=(1, 3))
    far = outside(hole_cells, LATENT_BAND_CELLS)
    if not far.any():
        problems.append("no latent cell lies outside the hole and its band: the check needs a smaller hole")
    elif not np.array_equal(latent_on[..., far], latent_off[..., far]):
        problems.append(f"the branch changed the kept latent outside the hole (max |difference| "
                        f"{np.abs(latent_on[..., far] - latent_off[..., far]).max():.3g})")
    if np.array_equal(latent_on, latent_off):
        problems.append("the sampled latents are equal with the branch on and off")
    return problems


def save_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh)


def load_workflow(name: str) -> dict[str, Any]:
    """A UI-format workflow of ``example_workflows/``."""
    with open(os.path.join(REPO, "example_workflows", name), encoding="utf-8") as fh:
        return json.load(fh)


def ui_to_api(graph: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """The API prompt the browser would send for a UI-format workflow: links become [node id, slot], widget values
    are assigned to the unlinked widget inputs in INPUT_TYPES order (required, then optional), skipping the extra
    value a `control_after_generate` widget stores and LoadImage's upload button. Optional inputs added after the
    workflow was saved get no value (the server's default), as in the browser."""
    links = {link[0]: link for link in graph["links"]}
    prompt = {}
    for node in graph["nodes"]:
        spec = info[node["type"]]["input"]
        specs = {**spec.get("required", {}), **spec.get("optional", {})}
        inputs: dict[str, Any] = {}
        for socket in node["inputs"]:
            if socket.get("link") is not None:
                link = links[socket["link"]]
                inputs[socket["name"]] = [str(link[1]), link[2]]
        values = iter(node.get("widgets_values") or [])
        for name, (kind, *options) in specs.items():
            if name in inputs or not (isinstance(kind, list) or kind in WIDGET_TYPES):
                continue
            value = next(values, None)
            if value is None and name in spec.get("optional", {}):
                continue  # saved before the input existed: the node's default applies, as in the browser
            if value is None:
                raise ValueError(f"node {node['id']} ({node['type']}) has no widget value for {name}")
            inputs[name] = value
            if options and options[0].get("control_after_generate"):
                next(values)
        left = list(values)
        if left != (["image"] if node["type"] == "LoadImage" else []):
            raise ValueError(f"node {node['id']} ({node['type']}) has widget values {left} left over")
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt

def workflow_prompt(graph: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """:func:`ui_to_api` after checking the saved graph against the server's ``/object_info``: every node type exists
    with the outputs it was saved with, and every link carries its source's output type into the socket that names
    it (what the browser checks when it loads a shared workflow)."""
    nodes = {n["id"]: n for n in graph["nodes"]}
    for node in nodes.values():
        if node["type"] not in info:
            raise ValueError(f"node {node['id']}: the server has no node {node['type']!r}")
        if [o["type"] for o in node["outputs"]] != info[node["type"]]["output"]:
            raise ValueError(f"node {node['id']} ({node['type']}) was saved with outputs "
                             f"{[o['type'] for o in node['outputs']]}, the server's are {info[node['type']]['output']}")
    for link_id, src, src_slot, dst, dst_slot, kind in graph["links"]:
        if info[nodes[src]["type"]]["output"][src_slot] != kind:
            raise ValueError(f"link {link_id} carries {kind} but node {src} output {src_slot} is "
                             f"{info[nodes[src]['type']]['output'][src_slot]}")
        if nodes[dst]["inputs"][dst_slot].get("link") != link_id:
            raise ValueError(f"link {link_id} ends at node {dst} input {dst_slot}, which does not name it")
    return ui_to_api(graph, info)
