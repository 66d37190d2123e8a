"""Import rules between the rooms (DESIGN §1), read from the source with ``ast`` (nothing is imported).

Why a test: the rules only hold if something fails when they are broken. A module's imports are every ``import`` /
``from ... import`` statement anywhere in it (lazy imports inside functions count too), with relative imports
resolved against the module's package.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def module_imports(path: Path) -> set[str]:
    """Full dotted names imported by the file at ``path`` (``from a.b import c`` gives ``a.b`` and ``a.b.c``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}
    return names


def room_imports(folder: str) -> dict[str, set[str]]:
    """{file relative to the repo: its imports} for every .py file under ``folder``."""
    found = {}
    for root, _, files in os.walk(REPO / folder):
        for name in files:
            if name.endswith(".py"):
                path = Path(root) / name
                found[str(path.relative_to(REPO))] = module_imports(path)
    return found


def _offenders(folder: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    bad = {}
    for file, names in room_imports(folder).items():
        hits = sorted(n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden))
        if hits:
            bad[file] = hits
    return bad


def _top_level(folder: str) -> set[str]:
    return {name.split(".")[0] for names in room_imports(folder).values() for name in names}


def test_rooms_do_not_cross():
    assert not _top_level("painternet_core") & {"comfy", "nodes", "training", "folder_paths", "comfy_extras"}
    assert "training" not in _top_level("nodes")
    assert not _top_level("training") & {"comfy", "nodes", "folder_paths"}


def test_painterbench_and_painterdata_never_import_the_trainer():
    assert _offenders("training/painterbench", ("training.trainer",)) == {}
    assert _offenders("training/painterdata", ("training.trainer",)) == {}


def test_the_shard_format_owner_and_the_inference_module_import_no_other_room():
    rooms = ("training.trainer", "training.painterbench", "training.painterdata")
    assert {f: n for f, n in _offenders("training/painterdata", rooms).items()
            if f.endswith("shards.py")} == {}
    inference = module_imports(REPO / "training" / "inference.py")
    assert not [n for n in inference if n.startswith(rooms)]


def test_the_trainer_imports_inference_never_evaluation():
    assert _offenders("training/trainer", ("training.painterbench",)) == {}
    trainer = set().union(*room_imports("training/trainer").values())
    assert "training.inference" in trainer


def test_every_training_module_lives_in_a_room():
    # train.py is the documented command (`python training/train.py`), a launcher that only runs the trainer room's.
    # output_names.py is the one rule for files named after data, shared by the trainer, captioner and bench rooms.
    shared = ("__init__.py", "inference.py", "cli.py", "train.py", "output_names.py")
    loose = sorted(p.name for p in (REPO / "training").glob("*.py") if p.name not in shared)
    assert loose == []


def test_bench_never_imports_tests():
    test_modules = {p.stem for p in (REPO / "tests").glob("*.py")} | {"tests"}
    bad = {}
    for file, names in room_imports("bench").items():
        hits = sorted(n for n in names if n.split(".")[0] in test_modules)
        if hits:
            bad[file] = hits
    assert bad == {}
    for path in (REPO / "bench").glob("*.py"):
        assert '"tests"' not in path.read_text(encoding="utf-8"), f"{path.name} puts tests/ on sys.path"


def test_the_harness_never_imports_tests_or_the_trainer():
    test_modules = {p.stem for p in (REPO / "tests").glob("*.py")} - {"conftest"} | {"conftest", "tests"}
    bad = {f: sorted(n for n in names if n.split(".")[0] in test_modules or n.startswith("training"))
           for f, names in room_imports("harness").items()}
    assert {f: n for f, n in bad.items() if n} == {}
