"""Short registry-only route bodies run on the event loop thread, when that cannot wait.

A sync route body runs on anyio's thread pool: after an idle pause that wakes a worker thread
and then the loop again (each ~0.3-0.5 ms on a 2-vCPU VM, strace/py-spy, docs/benchmarks.md),
more than the registry read it wraps. ``run`` calls the same body on the loop thread instead,
but only when nothing in it can wait: the registry's server is not known to be down and its
pool holds an idle connection (``Runtime.registry_ready``), and the caller says the body is
registry-only. Anything else (a server found down, every connection busy, a cold clone) goes
to the thread pool as before, so the loop (other requests) never waits for a connection.

A warm handout runs here as the service's ``hand_out``, which never clones: a spare that went
meanwhile makes it answer None, and the provision then runs on the thread pool. What it cannot
see coming: a server that stops answering (frozen, not down) in the very call, which then
holds the loop until the connection fails, where a thread would hold only its own request.
``tests/integration/test_api_inline.py``, ``test_http_path.py``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from starlette.concurrency import run_in_threadpool

from monk.api.runtime import Runtime

T = TypeVar("T")


async def run(rt: Runtime, body: Callable[[], T], *, registry_only: bool = True) -> T:
    """``body()``: on the loop thread when ``registry_only`` and the registry is ready now,
    else on the thread pool."""
    if registry_only and rt.registry_ready():
        return body()
    return await run_in_threadpool(body)
