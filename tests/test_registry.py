"""Registry-ready metadata: `pyproject.toml` passes the ComfyUI registry's own `comfy node validate` (comfy-cli, which
.ci/run installs into .cache/comfy-cli) and its icon is the square PNG shipped in docs/."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib

import pytest
from PIL import Image

from conftest import CACHE, REPO

COMFY_CLI_ARGS = ["--skip-prompt", "--no-enable-telemetry", "node", "validate"]


def _comfy_cli() -> str:
    found = os.environ.get("PAINTERNET_COMFY_CLI") or shutil.which("comfy") or os.path.join(
        CACHE, "comfy-cli", "bin", "comfy")
    if not os.path.isfile(found):
        message = ("comfy-cli not found: .ci/run installs it (python -m venv .cache/comfy-cli && "
                   ".cache/comfy-cli/bin/pip install comfy-cli==1.23.0); or set PAINTERNET_COMFY_CLI")
        (pytest.fail if os.environ.get("PAINTERNET_REQUIRE_COMFY_CLI") == "1" else pytest.skip)(message)
    return found


def _validate(cli: str, cwd: str, home: str) -> subprocess.CompletedProcess:
    # A private HOME: comfy-cli writes its config there, never into the user's.
    env = dict(os.environ, HOME=home, XDG_CONFIG_HOME=os.path.join(home, ".config"))
    return subprocess.run([cli, *COMFY_CLI_ARGS], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_comfy_node_validate_passes(tmp_path):
    cli = _comfy_cli()
    result = _validate(cli, REPO, str(tmp_path))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "All validation checks passed" in out and "Security warnings" not in out, out
    # The validator really reads the file: the same metadata with an empty version is refused.
    broken = tmp_path / "broken"
    broken.mkdir()
    text = open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8").read()
    (broken / "pyproject.toml").write_text(re.sub(r'(?m)^version = ".*"$', 'version = ""', text), encoding="utf-8")
    refused = _validate(cli, str(broken), str(tmp_path))
    assert refused.returncode != 0 and "version is empty" in refused.stdout + refused.stderr


def test_registry_metadata_and_icon():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as fh:
        meta = tomllib.load(fh)
    project, comfy = meta["project"], meta["tool"]["comfy"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]), project["version"]
    repository = project["urls"]["Repository"]
    owner_repo = repository.removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/main/"
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["Icon"].startswith(prefix), comfy
    icon = os.path.join(REPO, comfy["Icon"][len(prefix):])
    assert os.path.isfile(icon), f"Icon URL {comfy['Icon']} names no file of the repository"
    with Image.open(icon) as img:
        assert img.format == "PNG" and img.size[0] == img.size[1] and 64 <= img.size[0] <= 400, (img.format, img.size)


def test_registry_names_the_frontend_and_devices_the_pack_supports():
    """The frontend floor is one the ComfyUI the pack requires really ships (its requirements pin), so the registry
    never offers the pack to a ComfyUI whose own frontend it refuses; OS and accelerator classifiers are present."""
    from conftest import COMFYUI_PATH

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)["project"]
    (frontend,) = [d for d in project["dependencies"] if d.startswith("comfyui-frontend-package")]
    floor = tuple(int(x) for x in re.fullmatch(r"comfyui-frontend-package>=(\d+)\.(\d+)\.(\d+)", frontend).groups())
    with open(os.path.join(COMFYUI_PATH, "requirements.txt"), encoding="utf-8") as fh:
        pinned = re.search(r"(?m)^comfyui-frontend-package==(\d+)\.(\d+)\.(\d+)$", fh.read())
    assert pinned, "ComfyUI no longer pins its frontend in requirements.txt"
    assert floor <= tuple(int(x) for x in pinned.groups()), (frontend, pinned.group(0))
    classifiers = project["classifiers"]
    assert any(c.startswith("Operating System ::") for c in classifiers)
    assert any(c.startswith("Environment :: GPU ::") for c in classifiers)
