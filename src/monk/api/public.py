"""What HTTP answers show of server paths: none. Each known folder becomes its label
(``<archives>/tenant_….dump``, ``<MONK_TEMPLATE_PATH>/blog/…``), any other path ``<path>``;
the CLI, run by the server's operator, shows them as they are."""

from __future__ import annotations

from typing import Any

from monk.core.redact import without_paths
from monk.service import templates as template_service
from monk.settings import Settings


def scrubbed(settings: Settings, value: Any) -> Any:
    """``value`` with server paths taken out of every string in it (dicts and lists too)."""
    labels = template_service.path_labels(settings)

    def scrub(v: Any) -> Any:
        if isinstance(v, str):
            return without_paths(v, labels)
        if isinstance(v, dict):
            return {k: scrub(x) for k, x in v.items()}
        if isinstance(v, list):
            return [scrub(x) for x in v]
        return v

    return scrub(value)
