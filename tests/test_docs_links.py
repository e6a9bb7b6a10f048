"""The README and docs/ point at things that exist: every relative markdown link resolves to a file
(and its ``#anchor`` to a heading there), and every repository path they name in inline code exists."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "bench" / "README.md", ROOT / "bench" / "results" / "README.md",
                *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
# a repository path inside inline code; a path followed by a placeholder (<name>, *) is a pattern, not a file
REPO_PATH = re.compile(r"(?<![\w./-])((?:csrc|fastopt|tests|triton_kernels|bench|docs|\.ci)/[\w./-]*)(?![\w<*])")


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")


def anchors(page):
    seen, out = {}, set()
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(page):
    bad = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no such heading")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert page.exists()
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_repository_paths_exist(page):
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    named = {m for span in CODE_SPAN.findall(text) for m in REPO_PATH.findall(span)}
    assert sorted(p for p in named if not (ROOT / p).exists()) == []


def test_checks_catch_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](page.md#title) [gone](missing.md) [bad anchor](page.md#nowhere)\n")
    assert broken_links(page) == ["missing.md: no such file", "page.md#nowhere: no such heading"]
