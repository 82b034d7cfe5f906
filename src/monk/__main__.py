"""``python -m monk``: the CLI (``monk bench --http`` serves this very interpreter's monk)."""

from monk.cli.main import run

run()
