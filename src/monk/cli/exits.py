"""The CLI's exit codes, named once. Errors take theirs from ``ERROR_TABLE`` (monk.errors);
the few results that are not errors but still exit non-zero are named here."""

from __future__ import annotations

from monk.errors import DatabaseUnavailable, MonkError, table_entry


def exit_code(error_class: type[MonkError]) -> int:
    """The exit code ``ERROR_TABLE`` gives an error class."""
    return table_entry(error_class)[1]


# A check that ran and found problems (doctor, tenant health, template check), or a bulk
# create where some names failed: a result, printed in full, not an error message.
PROBLEMS_FOUND = 1
# 'monk db status' on a server that does not accept connections: what DatabaseUnavailable exits.
SERVER_DOWN = exit_code(DatabaseUnavailable)
# An exception that is not a MonkError: a bug, reported on one line.
INTERNAL_ERROR = exit_code(MonkError)
# Ctrl-C, as shells report SIGINT (128 + 2).
INTERRUPTED = 130
