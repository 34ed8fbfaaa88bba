"""Every relative link in README.md and docs/*.md points at a file of the repository (and, for
``file.md#anchor``, at a heading of that file), and every ``docs/NAME.md`` named in the text
exists.  The checker is tested on a planted broken link so that it can fail."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
NAMED_DOC = re.compile(r"(?<![\w/.-])docs/[\w.-]+\.md\b")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for line in text.splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """The relative links of ``page`` whose target (or anchor) does not exist."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    bad = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = page if not path else (page.parent / path).resolve()
        if not dest.exists():
            bad.append(f"{page.name}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{page.name}: {target} (no heading #{anchor})")
    for name in NAMED_DOC.findall(text):
        if not (root / name).exists():
            bad.append(f"{page.name}: names {name} (no such file)")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_the_science_notes_are_in_the_repository():
    assert (ROOT / "docs" / "science.md").is_file()
    assert "../shared/docs" not in "".join(p.read_text(encoding="utf-8") for p in PAGES)


def test_the_checker_finds_planted_breaks(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "there.md").write_text("# A heading, with `code`\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text("[ok](there.md) [ok](there.md#a-heading-with-code) [web](https://example.org/x.md)\n"
                    "[gone](missing.md) [bad anchor](there.md#nowhere) see docs/absent.md and docs/there.md\n"
                    "```\n[in a code block](ignored.md)\n```\n")
    assert broken_links(page, root=tmp_path) == [
        "page.md: missing.md (no such file)",
        "page.md: there.md#nowhere (no heading #nowhere)",
        "page.md: names docs/absent.md (no such file)",
    ]
