"""The README links every docs page, and no relative link in the README or docs/ is broken (nor an anchor it names)."""
from __future__ import annotations

import re

import pytest

from .conftest import ROOT

LINK = re.compile(r"\]\(([^)\s]+)\)")
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def relative_links(page):
    """Returns the page's links that point into the repository (no scheme, no pure anchor)."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links inside code blocks are code
    return [m for m in LINK.findall(text) if not re.match(r"[a-z]+:", m) and not m.startswith("#")]


def test_readme_links_every_docs_page():
    linked = {m.split("#")[0] for m in relative_links(ROOT / "README.md")}
    missing = [p.relative_to(ROOT).as_posix() for p in PAGES[1:] if p.relative_to(ROOT).as_posix() not in linked]
    assert not missing, f"README.md does not link {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    broken = [m for m in relative_links(page) if not (page.parent / m.split("#")[0]).exists()]
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def anchors(page):
    """The anchors a Markdown page offers: its headings as GitHub slugs them, and <a id="…">."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
             for h in re.findall(r"^#+\s+(.*)$", text, flags=re.M)}
    return slugs | set(re.findall(r'<a id="([^"]+)">', text))


@pytest.mark.parametrize("page", [*PAGES, ROOT / "benchmarks" / "README.md"], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_anchors_name_a_heading(page):
    wrong = []
    for link in LINK.findall(re.sub(r"```.*?```", "", page.read_text(), flags=re.S)):
        path, _, anchor = link.partition("#")
        target = page.parent / path if path else page
        if anchor and not re.match(r"[a-z]+:", link) and target.suffix == ".md" and target.exists():
            if anchor not in anchors(target):
                wrong.append(link)
    assert not wrong, f"{page.relative_to(ROOT)}: links to anchors that are not there: {wrong}"
