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

import requests

from harness import COMFYUI_PATH, REPO

PACK_NAME = "ComfyUI-PainterNet"
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


def save_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
