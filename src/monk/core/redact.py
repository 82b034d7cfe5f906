"""Server paths out of texts that leave the server (HTTP answers): a client must not learn where
monk keeps its files. Pure: the caller says which folders it knows and how to name them."""

from __future__ import annotations

import re
from collections.abc import Mapping

# An absolute (or ~) path of one or more components, not inside a word, URL or relative path,
# nor after a label put in by ``without_paths``, nor one of monk's own routes (/api/…: an error
# may name the route that fixes it, and no file lives there).
_PATH = re.compile(r"(?<![\w.:/~>-])(?!/api/)~?/(?:[\w.@+%-]+/)*[\w.@+%-]+/?")


def without_paths(text: str, labels: Mapping[str, str] | None = None) -> str:
    """``text`` with each known folder replaced by its label (the rest of the path, inside
    the folder, kept), then any other absolute path by ``<path>``."""
    known = labels or {}
    for folder in sorted(known, key=len, reverse=True):
        if folder.rstrip("/"):
            # Whole components only: /srv/t is not the start of /srv/t2.
            exact = re.escape(folder.rstrip("/")) + r"(?![\w.@+%-])"
            text = re.sub(exact, known[folder].replace("\\", "\\\\"), text)
    return _PATH.sub("<path>", text)
