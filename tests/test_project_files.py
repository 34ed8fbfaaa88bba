"""LICENSE, CITATION.cff and the generated API reference (docs/api.md) stay consistent with the
package: the licence pyproject declares, the version, and docstrings as they are now."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

import chemtwin

ROOT = Path(__file__).resolve().parents[1]
# the reference types of the Citation File Format 1.2.0 schema that this file uses
CFF_REFERENCE_TYPES = {"article", "book", "conference-paper", "data", "dataset", "report", "software", "thesis",
                       "website", "generic"}


def test_license_is_mit_as_pyproject_says():
    assert re.search(r'^license = \{ text = "MIT" \}$', (ROOT / "pyproject.toml").read_text(), re.M)
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert "Copyright (c) 2026 chemtwin developers" in text


def test_citation_cff_parses_and_has_what_cff_1_2_requires():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0"
    for key in ("message", "title", "authors"):
        assert cff[key], key
    assert cff["version"] == chemtwin.__version__
    assert cff["license"] == "MIT"
    refs = cff["references"]
    for ref in refs:
        assert ref["type"] in CFF_REFERENCE_TYPES, ref["title"]
        assert ref["title"] and ref["authors"] and isinstance(ref["year"], int), ref["title"]
        for author in ref["authors"]:
            assert "family-names" in author or "name" in author, ref["title"]
        if "doi" in ref:
            assert re.fullmatch(r"10\.\d{4,9}/\S+", ref["doi"]), ref["doi"]
    cited = " ".join(f"{r['authors'][0].get('family-names', '')} {r['year']}" for r in refs)
    for work in ("de Mijolla 2019", "Ness 2015", "Ting 2019", "Abdurro'uf 2022", "García Pérez 2016",
                 "Leung 2019", "Johnson 2021", "Douze 2024", "Price-Jones 2019"):
        assert work in cited, work


def test_api_reference_is_up_to_date(tmp_path):
    """docs/api.md is what scripts/build_api_docs.py writes from the docstrings now: rerun the
    script after changing a public docstring or signature."""
    out = tmp_path / "api.md"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_api_docs.py"), "--out", str(out)], check=True,
                   cwd=ROOT)
    assert out.read_text(encoding="utf-8") == (ROOT / "docs" / "api.md").read_text(encoding="utf-8"), (
        "docs/api.md is stale: run python scripts/build_api_docs.py")
