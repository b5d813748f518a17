"""The docs stay true to the code that cites them, and the code keeps its measurements in bench/.

Docstrings cite ``docs/model.md`` and ``docs/fast-path.md`` by section anchor: every cited
section must exist. Docstrings and comments say what a thing does, never how fast it was on
which day: no dates, commit hashes or speed ratios in the package's sources (bench/ holds them).
"""
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(path for folder in ("crossfuse_fast", "kernels", "reference") for path in (ROOT / folder).rglob("*.py"))
CITING = SOURCES + sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "bench").glob("*.py")) + [ROOT / "README.md"]
CITATION = re.compile(r"docs/([\w-]+\.md)(?:#([\w-]+))?")
MEASUREMENT = {
    "a date": re.compile(r"\b20\d\d-\d\d-\d\d\b"),
    "a commit hash": re.compile(r"\b(?:at|commit|run at)\s+[0-9a-f]{7,40}\b"),
    "a speed ratio": re.compile(r"\b\d+\.\d+x\b"),
}


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of ``markdown``."""
    anchors = set()
    for line in markdown.splitlines():
        heading = re.match(r"#+\s+(.*)", line)
        if heading:
            text = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def test_github_anchors_follow_githubs_rule():
    assert github_anchors("# The model\n## The decoder's box filters as their algebra\n### Stage 1: the x") == {
        "the-model", "the-decoders-box-filters-as-their-algebra", "stage-1-the-x"}


def test_every_cited_section_exists():
    anchors = {path.name: github_anchors(path.read_text(encoding="utf-8")) for path in (ROOT / "docs").glob("*.md")}
    cited = 0
    for path in CITING:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            for name, anchor in CITATION.findall(line):
                where = f"{path.relative_to(ROOT)}:{number}"
                assert name in anchors, f"{where} cites docs/{name}, which does not exist"
                assert not anchor or anchor in anchors[name], f"{where} cites docs/{name}#{anchor}: no such section"
                cited += 1
    assert cited > 30


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_sources_carry_no_measurements(path):
    """Docstrings, comments and help texts (every string and comment of the file) hold no dates,
    commit hashes or speed ratios, and cite docs/, not the ground truth's section numbers."""
    source = path.read_text(encoding="utf-8")
    assert not re.search(r"SPEC \d", source), f"{path.name} cites SPEC sections; cite docs/model.md"
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in (tokenize.STRING, tokenize.COMMENT):
            for what, pattern in MEASUREMENT.items():
                found = pattern.search(token.string)
                assert not found, f"{path.name}:{token.start[0]} holds {what} ({found.group(0)!r}); bench/ keeps those"
