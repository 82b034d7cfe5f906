"""Server paths out of texts sent to HTTP clients (``monk.core.redact``)."""

from __future__ import annotations

import pytest

from monk.core.redact import without_paths


def test_known_folders_become_their_labels_and_keep_what_is_inside() -> None:
    labels = {"/opt/venv/lib/site-packages/monk/templates/builtin": "<builtin>", "/srv/t": "<T>"}
    text = "/opt/venv/lib/site-packages/monk/templates/builtin/basic/template.json: invalid JSON"
    assert without_paths(text, labels) == "<builtin>/basic/template.json: invalid JSON"
    assert without_paths("in /srv/t/x, and /srv/t2/y", labels) == "in <T>/x, and <path>"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("no source in /usr/lib/x, /home/u/y", "no source in <path>, <path>"),
        ("archive '/var/lib/monk/a.dump' is missing", "archive '<path>' is missing"),
        ("see ~/notes/x.txt", "see <path>"),
        ("and/or 1/2 at http://h.example/api/x", "and/or 1/2 at http://h.example/api/x"),
        ("template 'basic' has no build", "template 'basic' has no build"),
        # monk's own routes name no file: an error may say which one fixes it.
        ("or POST /api/root/template/crm)", "or POST /api/root/template/crm)"),
        ("under /apiary/x", "under <path>"),
    ],
)
def test_any_other_absolute_path_is_hidden(text: str, expected: str) -> None:
    assert without_paths(text) == expected
