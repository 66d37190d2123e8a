"""The front page and the docs/ pages stay connected: every relative link (files and `#anchors`, GitHub's heading
slugs) in README.md and docs/*.md resolves, and no figure or benchmark log is orphaned by a move between pages."""
from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path

import pytest

from conftest import REPO

ROOT = Path(REPO)
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~)")


def _prose(text: str) -> str:
    """The page without fenced code blocks and inline code spans, where brackets are not links."""
    kept, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            in_fence = not in_fence
            continue
        if not in_fence:
            kept.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(kept)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading).strip().lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: dict[str, int] = {}
    out = set()
    in_fence = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.lstrip()):
            in_fence = not in_fence
            continue
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading and not in_fence:
            slug = _slug(heading.group(1))
            n = found.get(slug, 0)
            found[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(page: Path) -> list[str]:
    return [m.group(1) for m in LINK.finditer(_prose(page.read_text(encoding="utf-8")))]


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: — not checked offline
            continue
        path_part, _, fragment = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{fragment} in {dest.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []
    if page.parent.name == "docs":
        assert "../README.md" in links(page), f"{page.name} has no way back to the front page"


def test_checker_catches_broken_links(tmp_path):
    page = tmp_path / "p.md"
    (tmp_path / "q.md").write_text("# Load PainterNet (`PainterNetLoader`)\n\n## Many GPUs / nodes\n## Many GPUs / nodes\n")
    page.write_text("[a](q.md#load-painternet-painternetloader) [b](q.md#many-gpus--nodes-1) [c](https://x.y/#z)\n"
                    "`[not a link](nowhere.md)`\n```\n[nor this](nowhere.md)\n```\n"
                    "[d](missing.md) [e](q.md#no-such) ![f](gone.png) [g](#nothing-here)\n")
    assert [b.split(":")[0] for b in broken_links(page)] == ["missing.md", "q.md#no-such", "gone.png", "#nothing-here"]


def test_front_page_is_short_and_links_every_docs_page():
    readme = ROOT / "README.md"
    assert len(readme.read_text(encoding="utf-8").splitlines()) <= 250
    linked = {os.path.normpath(t.partition("#")[0]) for t in links(readme)}
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in linked, f"docs/{page.name} is not linked from the front page"
    text = readme.read_text(encoding="utf-8")
    for command in ("bash scripts/run_comfyui.sh --cpu", "bash scripts/test.sh"):
        assert command in text
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text(encoding="utf-8"), \
        ".ci/run must run the test command the front page gives"


def test_every_figure_and_benchmark_log_is_referenced():
    """A move between pages must not drop a picture or the log a figure comes from."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in PAGES)
    pictures = [p for p in (ROOT / "docs").glob("*.png") if p.name != "icon.png"]  # icon: pyproject [tool.comfy]
    logs = [p for p in (ROOT / "bench" / "results").glob("*") if "dry-run" not in p.name]
    missing = [p.relative_to(ROOT).as_posix() for p in pictures + logs if p.name not in text]
    assert missing == []
