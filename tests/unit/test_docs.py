"""The documentation stays navigable: a short README, no broken local link or anchor, and every
setting of ``Settings`` in docs/configuration.md with its real default (no database)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from monk.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
README_MAX_BYTES = 12 * 1024

_FENCE = re.compile(r"^```.*?^```[^\n]*$", re.MULTILINE | re.DOTALL)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*$", re.MULTILINE)


def _prose(text: str) -> str:
    """The text without code blocks, where brackets and '#' lines are not Markdown."""
    return _FENCE.sub("", text)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    return {
        re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        for heading in _HEADING.findall(_prose(path.read_text(encoding="utf-8")))
    }


def _local_links(path: Path) -> list[str]:
    text = _CODE.sub("", _prose(path.read_text(encoding="utf-8")))
    return [
        target
        for target in _LINK.findall(text)
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target)  # http:, https:, mailto: …
    ]


def test_there_are_docs_pages() -> None:
    assert DOCS, "docs/*.md is missing"


def test_readme_is_a_front_door() -> None:
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes, over {README_MAX_BYTES}: move reference text to docs/"
    )


def test_readme_links_every_docs_page() -> None:
    linked = {(README.parent / t.split("#")[0]).resolve() for t in _local_links(README)}
    missing = [p.name for p in DOCS if p.resolve() not in linked]
    assert not missing, f"README.md links no docs page {missing}"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_local_links_resolve(page: Path) -> None:
    broken = []
    for target in _local_links(page):
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.name}: broken links {broken}"


def _table_rows(text: str) -> dict[str, list[str]]:
    """The settings table: variable -> its cells."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells and re.fullmatch(r"`MONK_[A-Z_]+`", cells[0]):
            rows[cells[0].strip("`")] = cells
    return rows


def _documented_default(value: object) -> str | None:
    """How the table writes a default it can be checked against (None: not checkable)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int | float | str):
        return str(value)
    if isinstance(value, dict | list):
        return json.dumps(value)
    return None  # unset (None), or a path computed on this machine


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_every_setting_is_documented_with_its_default(field: str) -> None:
    rows = _table_rows((ROOT / "docs" / "configuration.md").read_text(encoding="utf-8"))
    variable = f"MONK_{field.upper()}"
    assert variable in rows, f"{variable} is missing from the table in docs/configuration.md"
    default = _documented_default(
        Settings.model_fields[field].get_default(call_default_factory=True)
    )
    if default is not None:
        assert f"`{default}`" in rows[variable][1], (
            f"{variable}: docs/configuration.md says {rows[variable][1]}, the code {default!r}"
        )
