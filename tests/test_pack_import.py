"""The pack, loaded the way ComfyUI loads a custom node, adds only `painternet_core` to the importable top-level
names: its `training`, `tests`, `bench`, `harness` and `scripts` folders must not shadow another pack's modules."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from conftest import COMFYUI_PATH, REPO


def test_loading_the_pack_exposes_only_painternet_core(tmp_path):
    # A fresh interpreter started outside the repository: pytest's own sys.path (the repo, tests/) would mask a leak.
    script = textwrap.dedent(f"""
        import asyncio, importlib, importlib.util, json, os, sys
        sys.path.insert(0, {COMFYUI_PATH!r})
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
        import nodes
        link = os.path.join({str(tmp_path)!r}, "custom_nodes", "ComfyUI-PainterNet")
        os.makedirs(os.path.dirname(link))
        os.symlink({REPO!r}, link)
        path_before = list(sys.path)
        assert asyncio.run(nodes.load_custom_node(link)), "ComfyUI failed to import the pack"
        repo = os.path.realpath({REPO!r})
        comfy = os.path.realpath({COMFYUI_PATH!r})  # CI keeps ComfyUI (with its own `tests`) inside the checkout
        leaked = {{}}
        for name in ("training", "tests", "bench", "harness", "scripts"):
            spec = importlib.util.find_spec(name)
            places = [spec.origin, *(spec.submodule_search_locations or [])] if spec else []
            ours = [p for p in places if p and os.path.realpath(p).startswith(repo + os.sep)
                    and not os.path.realpath(p).startswith(comfy + os.sep)]
            if ours:
                leaked[name] = ours
        import painternet_core.config
        pack = sys.modules[link.replace(".", "_x_")]
        branch = importlib.import_module(pack.__name__ + ".nodes.branch")
        print(json.dumps({{
            "leaked": leaked,
            "path_added": [p for p in sys.path if p not in path_before],
            "core_file": painternet_core.__file__,
            "one_config_class": branch.PainterNetConfig is painternet_core.config.PainterNetConfig,
            "loader": "PainterNetLoader" in nodes.NODE_CLASS_MAPPINGS,
        }}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["leaked"] == {}
    assert found["path_added"] == []
    assert os.path.realpath(found["core_file"]) == os.path.realpath(os.path.join(REPO, "painternet_core",
                                                                                 "__init__.py"))
    assert found["one_config_class"] and found["loader"]
