"""The README and docs/: short, linked, and showing commands that exist.

Cheap checks only (no run, no Ray): the README's size, every relative link and
anchor of the README and docs/ resolving, every `fiqa` subcommand the README
shows answering `--help`, and the README's test command being what CI runs.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
MAX_README_BYTES = 12 * 1024
PAGES = [README, *sorted(DOCS.glob("*.md"))]

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def _links(page: Path) -> list[str]:
    """Relative link targets of a Markdown page (web links and mail left out)."""
    text = _FENCE.sub("", page.read_text())
    return [t for t in _LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of ``page``."""
    out = set()
    for line in _FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"#+\s+(.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


def _shell_lines(page: Path) -> list[str]:
    """Commands in the page's bash blocks, continuation lines joined, comments cut."""
    lines = []
    for lang, body in _FENCE.findall(page.read_text()):
        if lang not in ("bash", "sh", ""):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _fiqa_commands(page: Path) -> list[list[str]]:
    """argv of every `fiqa ...` command shown in the page's shell blocks."""
    return [shlex.split(line)[1:] for line in _shell_lines(page) if line.startswith("fiqa ")]


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size <= MAX_README_BYTES, f"README.md is {size} bytes; move details to docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_links_resolve(page):
    for target in _links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to {target}: no such file"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{page.name}: link to {target}: no such heading"


def test_readme_links_every_docs_page():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in _links(README)}
    pages = set(DOCS.glob("*.md"))
    assert pages, "docs/ has no pages"
    assert {p.resolve() for p in pages} <= linked, "a docs/ page the README does not link"


def test_readme_commands_are_fiqa_subcommands_that_exist():
    shown = _fiqa_commands(README)
    subcommands = sorted({argv[0] for argv in shown})
    assert len(subcommands) >= 10, subcommands
    for sub in subcommands:
        proc = subprocess.run(
            [sys.executable, "-m", "fiqa.cli", sub, "--help"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        assert proc.returncode == 0, f"fiqa {sub} --help: {proc.stderr[-500:]}"


def test_readme_test_command_is_what_ci_runs():
    """.ci/run runs the README's test command; both must stay the same."""
    ci = [
        line.strip()
        for line in (REPO / ".ci/run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))
    ]
    assert ci == ["make test"], ci
    assert "make test" in _shell_lines(README)
    assert "make demo" in _shell_lines(README)


def test_scaling_page_has_a_gpus_section():
    """Other pages and changes point at docs/scaling.md's GPU section."""
    assert "gpus" in _anchors(DOCS / "scaling.md")


@pytest.mark.parametrize("argv", _fiqa_commands(README), ids=lambda a: " ".join(a)[:60])
def test_readme_commands_parse_as_written(argv):
    """Each example's flags and arguments are the CLI's (parsed, not run)."""
    from fiqa.cli import build_parser

    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"`fiqa {' '.join(argv)}` does not parse (exit {e.code})")
