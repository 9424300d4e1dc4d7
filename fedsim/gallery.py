"""`fedsim gallery`: docs/gallery.md and docs/gallery/ from the claims.md of reproductions.

Each source is a folder written by `fedsim reproduce NAME --out DIR` (or one written by
`fedsim reproduce all`, holding one such folder per paper). The page is built from those
files only: each paper's title, mode, runs, run time, figures and claim table come from
its claims.md, and the command that regenerates it from the paper's reproduce.py. Figures
are copied as 256-colour PNGs (a third of matplotlib's RGBA size for line plots).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import FedsimError
from .reproduce import PAPERS_DIR, available, command, describe_runs, load_paper, plan

MODE = re.compile(r"^Mode: (quick|full); run time (\d+) s(.*?)\.?\s*$")
RUNS = re.compile(r"^Runs: (.*); executor: (\w+)\.?\s*$")
REGENERATE = re.compile(r"^Regenerate: `fedsim reproduce (\S+)")
IMAGE = re.compile(r"^!\[([^\]]*)\]\(([^)]+\.png)\)\s*$")


@dataclass
class Entry:
    """One paper's reproduction as read from its claims.md."""

    name: str
    folder: Path
    title: str
    quick: bool
    seconds: int
    timing: str  # the rest of the Mode line: CPU time, load
    runs: str
    executor: str
    body: list[str]  # figure and table lines, images still relative to `folder`


def source_folders(sources: Sequence[str], papers_dir: Path = PAPERS_DIR) -> list[Path]:
    """Returns the folder each command-line source names: an existing folder as given; a paper
    name, its committed results (papers_dir/NAME/results); ``all``, every paper's results.
    Raises FedsimError for anything else."""
    names = available(papers_dir)
    folders = []
    for src in sources:
        if Path(src).is_dir():
            folders.append(Path(src))
        elif src == "all":
            folders += [papers_dir / n / "results" for n in names if (papers_dir / n / "results").is_dir()]
        elif src in names:
            folders.append(papers_dir / src / "results")
        else:
            raise FedsimError(f"{src}: neither a folder nor a paper name (papers: {', '.join(names)}, all)")
    return folders


def find_claims(sources: Sequence[Path]) -> list[Path]:
    """Returns every claims.md in the sources (a reproduction folder, or a folder of them)."""
    found = []
    for src in sources:
        here = [src / "claims.md"] if (src / "claims.md").is_file() else sorted(src.glob("*/claims.md"))
        if not here:
            raise FedsimError(f"{src}: no claims.md here or in its sub-folders (run `fedsim reproduce` first)")
        found += here
    return found


def paper_name(claims: Path, text: str, papers_dir: Path) -> str:
    """Returns the paper a claims.md belongs to: from its Regenerate line, else the nearest
    folder above it that is named like a paper (e.g. experiments/papers/NAME/results). It
    is always one of the papers in `papers_dir`: a claims.md names a paper, never a path to
    code (FedsimError otherwise)."""
    known = set(available(papers_dir))
    for line in text.splitlines():
        m = REGENERATE.match(line)
        if m:
            if m.group(1) not in known:
                raise FedsimError(f"{claims}: its Regenerate line names {m.group(1)[:80]!r}, which is not one of "
                                  f"fedsim's papers (known: {', '.join(sorted(known))})")
            return m.group(1)
    for part in reversed(claims.resolve().parent.parts):
        if part in known:
            return part
    raise FedsimError(f"{claims}: cannot tell which paper this is (no 'Regenerate:' line, no paper folder above it)")


def read_entry(claims: Path, papers_dir: Path = PAPERS_DIR) -> Entry:
    """Parses one claims.md (as `fedsim.reproduce.claims_markdown` writes it, or its older
    form without the Runs and Regenerate lines, whose runs are then taken from the paper)."""
    text = claims.read_text()
    lines = text.splitlines()
    name = paper_name(claims, text, papers_dir)
    if not lines or not lines[0].startswith("# "):
        raise FedsimError(f"{claims}: does not start with a '# title' line")
    mode = next((MODE.match(x) for x in lines if MODE.match(x)), None)
    if mode is None:
        raise FedsimError(f"{claims}: no 'Mode: quick|full; run time N s' line")
    quick = mode.group(1) == "quick"
    runs = next((RUNS.match(x) for x in lines if RUNS.match(x)), None)
    start = next(i for i, x in enumerate(lines) if IMAGE.match(x) or x.startswith("|"))
    return Entry(
        name, claims.parent, lines[0][2:].strip(), quick, int(mode.group(2)), mode.group(3).lstrip("; "),
        runs.group(1) if runs else describe_runs(plan(load_paper(name, papers_dir), quick)),
        runs.group(2) if runs else "serial",
        lines[start:],
    )


def copy_figure(src: Path, dst: Path) -> None:
    """Writes `src` to `dst` as a 256-colour optimised PNG."""
    from PIL import Image

    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        im.convert("RGB").quantize(colors=256).save(dst, optimize=True)


def render(entries: Sequence[Entry], invocation: str, papers_dir: Path = PAPERS_DIR) -> str:
    """Returns gallery.md for `entries` (images already at gallery/NAME/FILE)."""
    out = [
        "# Gallery: reproduced paper figures",
        "",
        "Every figure and claim table below was produced by `fedsim reproduce` and collected into",
        "this page (generated: edit the papers' reproduce.py, not this page) by",
        "",
        f"    {invocation}",
        "",
        "A claim is checked by the paper's own `report()` from the runs' metrics; **no** means the",
        "run does not support it, and the paper folders' READMEs say why where known. Quick mode",
        "runs fewer rounds and seeds than the paper (see each paper's reproduce.py), so its",
        "verdicts are indicative; full mode is what the paper folders document.",
        "",
    ]
    out += [f"- [{e.name}](#{e.name}): {e.title}" for e in entries]
    for e in entries:
        full = getattr(load_paper(e.name, papers_dir), "FULL_RUNTIME", None)
        full_note = f" Full mode: {full}." if e.quick and full else ""
        timing = f" ({e.timing})" if e.timing else ""
        out += [
            "",
            f'<a id="{e.name}"></a>',
            f"## {e.name}: {e.title}",
            "",
            f"**{'Quick' if e.quick else 'Full'} mode**, {e.runs}, executor {e.executor}; "
            f"run time {e.seconds} s{timing}.{full_note}  ",
            f"Regenerate: `{command(e.name, e.quick, None if e.executor == 'serial' else e.executor)}`"
            f" · paper folder: [experiments/papers/{e.name}](../experiments/papers/{e.name})",
            "",
        ]
        for line in e.body:
            m = IMAGE.match(line)
            out.append(f"![{m.group(1)}](gallery/{e.name}/{Path(m.group(2)).name})" if m else line)
    return "\n".join(out) + "\n"


def build(sources: Sequence[Path], docs: Path, invocation: str, papers_dir: Path = PAPERS_DIR) -> Path:
    """Writes docs/gallery.md and docs/gallery/NAME/*.png from the sources' claims.md files
    (the PNGs of docs/gallery/*/ are rebuilt from scratch); returns the page's path. Runs
    no code named by the files: each paper is one of `papers_dir`'s."""
    entries = [read_entry(c, papers_dir) for c in find_claims(sources)]
    names = [e.name for e in entries]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise FedsimError(f"more than one reproduction of {', '.join(twice)} among the sources; give one each")
    order = {n: i for i, n in enumerate(available(papers_dir))}
    entries.sort(key=lambda e: order.get(e.name, len(order)))
    folder = docs / "gallery"
    for old in folder.glob("*/*.png"):  # what an earlier build wrote; nothing else is deleted
        old.unlink()
    for e in entries:
        for line in e.body:
            m = IMAGE.match(line)
            if m:
                src = e.folder / m.group(2)
                if not src.resolve().is_relative_to(e.folder.resolve()):
                    raise FedsimError(f"{e.folder / 'claims.md'} shows {m.group(2)[:80]}, outside its folder")
                if not src.is_file():
                    raise FedsimError(f"{e.folder / 'claims.md'} shows {m.group(2)}, which is not there")
                copy_figure(src, folder / e.name / src.name)
    page = docs / "gallery.md"
    page.write_text(render(entries, invocation, papers_dir))
    return page
