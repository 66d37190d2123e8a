"""Run bench/gpu_inference.py (its arguments follow) as if only some distributions were installed: the GPU machine's
own packages plus the wheels scripts/prepare_device.sh carries. Any other distribution is made unfindable, exactly as
if it were missing (optional probes such as diffusers' `find_spec` see None), so a missing wheel shows up here, on
CPU, in a dry run, instead of costing a device call.

Usage: python scripts/device_import_check.py PACKAGES_FILE -- --dry-run [bench arguments]
PACKAGES_FILE lists the machine's distributions, separated by commas or newlines (for the workplace's device machine:
the "Packages:" list of its KINDS.md). The carried wheels are read from .carry/wheels.
"""
from __future__ import annotations

import importlib.abc
import importlib.metadata
import os
import re
import runpy
import sys
from collections.abc import Iterator
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip().lower())


def available(packages_file: str) -> set[str]:
    with open(packages_file) as f:
        text = f.read()
    if "Packages: " in text:  # a KINDS.md page: take its package list
        text = text.split("Packages: ", 1)[1].split(".\n", 1)[0]
    names = {_norm(n) for n in re.split(r"[,\n]", text) if n.strip()}
    wheels = os.path.join(REPO, ".carry", "wheels")
    for wheel in os.listdir(wheels) if os.path.isdir(wheels) else []:
        if wheel.endswith(".whl"):
            names.add(_norm(wheel.split("-", 1)[0]))
    return names


class OnlyAvailable(importlib.abc.MetaPathFinder):
    """Wraps the interpreter's finders; top-level modules of other installed distributions are not found."""

    def __init__(self, finders: list[Any], allowed: set[str]) -> None:
        self.finders = finders
        self.allowed = allowed
        self.owners = importlib.metadata.packages_distributions()
        self.hidden: set[str] = set()

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        top = name.split(".")[0]
        owners = {_norm(d) for d in self.owners.get(top, [])}
        if top not in sys.stdlib_module_names and owners and not owners & self.allowed:
            self.hidden.add(top)
            return None
        for finder in self.finders:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                return spec
        return None

    def find_distributions(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        for finder in self.finders:
            if hasattr(finder, "find_distributions"):
                yield from finder.find_distributions(*args, **kwargs)

    def invalidate_caches(self) -> None:
        for finder in self.finders:
            if hasattr(finder, "invalidate_caches"):
                finder.invalidate_caches()


def main() -> int:
    if len(sys.argv) < 2 or "--" not in sys.argv:
        raise SystemExit(__doc__.split("\n\n")[1])
    split = sys.argv.index("--")
    finder = OnlyAvailable(list(sys.meta_path), available(sys.argv[1]))
    sys.meta_path[:] = [finder]
    bench = os.path.join(REPO, "bench", "gpu_inference.py")
    sys.argv = [bench] + sys.argv[split + 1:]
    sys.path.insert(0, os.path.dirname(bench))
    code = 0
    try:
        runpy.run_path(bench, run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    print(f"distributions hidden (installed here, absent there): {sorted(finder.hidden) or 'none'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
