"""Templates on every host: a build of a key on each active host of the fleet, in parallel.

Each host builds from the same source, so each gets the same ``monk_template_<key>`` name and
the same version (the content hash of the source and the compiler); its state is its own
``template_builds`` rows (``host``). A host that fails (down, refusing, a step failing) has a
failed row saying why and leaves the others' builds alone. A host added later receives the
current builds by building them from source there (``receive``): see docs/hosts.md for why
not a dump and restore from another host.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monk.adapters.registry import hosts as host_registry
from monk.adapters.registry import templates as template_builds
from monk.errors import MonkError, OperationFailed

if TYPE_CHECKING:
    from monk.service.pipeline import Pipeline
    from monk.service.templates import BuildResult, TemplateBuild, TemplateService

HostProgress = Callable[[str, str], None]
"""``(host, step)``: called from each host's build thread."""


@dataclass(frozen=True)
class HostBuild:
    """One host's answer to a build: its result, or the error it failed with."""

    host: str
    result: BuildResult | None = None
    error: MonkError | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"host": self.host}
        if self.result is not None:
            out |= {"built": self.result.built, **self.result.build.as_dict()}
        if self.error is not None:
            out |= {"built": False, "error": {"code": self.error.code, "message": str(self.error)}}
        return out


def build_hosts(svc: Pipeline) -> list[str]:
    """The hosts a build goes to: the local one, then every active host of the fleet, by name.
    A draining host keeps the builds it has (no new tenant goes there)."""
    local = svc.hosts.local.name
    with svc.hosts.pools().system() as reg:
        rows = host_registry.list_all(reg)
    return [local] + [r.name for r in rows if not r.is_local and r.state == "active"]


def service_of(svc: Pipeline, host: str) -> TemplateService:
    """The template service of ``host``, on the pipeline's pools of that host."""
    if host == svc.hosts.local.name:
        return svc.templates
    from monk.service.templates import TemplateService

    return TemplateService(svc.settings, svc.hosts.pools(host))


def build_everywhere(
    svc: Pipeline,
    key: str,
    *,
    force: bool = False,
    source_dir: Path | None = None,
    recorded_anywhere: bool = False,
    progress: HostProgress | None = None,
    hosts: list[str] | None = None,
) -> list[HostBuild]:
    """Build ``key`` on every host (``build_hosts``, or ``hosts``) at once; one answer per
    host, the local one first. The source is read and validated once, here: a bad source
    fails before any host starts (and raises, as on one server)."""
    targets = hosts if hosts is not None else build_hosts(svc)
    if source_dir is None and recorded_anywhere and key not in svc.templates.available_keys():
        # Built with --source: every host reads the folder the local host's builds came from.
        source_dir = svc.templates.recorded_source(key)

    def one(host: str) -> HostBuild:
        def report(step: str) -> None:
            if progress is not None:
                progress(host, step)

        try:
            result = service_of(svc, host).build(
                key,
                force=force,
                source_dir=source_dir,
                progress=report,
                recorded_anywhere=recorded_anywhere,
            )
        except MonkError as exc:
            report("failed")
            return HostBuild(host, error=exc)
        report("done")
        return HostBuild(host, result=result)

    if len(targets) == 1:
        return [one(targets[0])]
    with ThreadPoolExecutor(len(targets), thread_name_prefix="monk-build") as threads:
        return list(threads.map(one, targets))


def receive(svc: Pipeline, host: str, progress: HostProgress | None = None) -> list[HostBuild]:
    """Give ``host`` (added later) the local host's current builds: each built there from the
    source the local build was made from, so the version (a content hash) is the same."""
    with svc.hosts.pools().system() as reg:
        current = template_builds.current_builds(reg, svc.hosts.local.name)
    answers = []
    for build in sorted(current, key=lambda b: b.key):
        answers += build_everywhere(
            svc,
            build.key,
            source_dir=Path(build.source) if build.source else None,
            recorded_anywhere=True,
            progress=progress,
            hosts=[host],
        )
    return answers


def raise_failures(key: str, answers: list[HostBuild]) -> None:
    """The local host's failure as it is (a bad source fails there first); another host's as
    OperationFailed naming them."""
    failed = [a for a in answers if a.error is not None]
    if not failed:
        return
    if failed[0] is answers[0]:
        assert failed[0].error is not None
        raise failed[0].error
    raise OperationFailed(
        f"template {key!r} failed to build on {len(failed)} of {len(answers)} host(s): "
        + "; ".join(f"{a.host}: {a.error}" for a in failed),
        step="build",
    )


def prune_everywhere(
    svc: Pipeline,
    key: str | None = None,
    *,
    retired_before: datetime | None = None,
    wait: bool = True,
) -> list[TemplateBuild]:
    """``TemplateService.prune`` on every host that has builds (draining ones too: retention
    frees their disks as well); a host that cannot be reached is left for the next pass
    (raised after the others were pruned)."""
    dropped: list[TemplateBuild] = []
    failed: list[tuple[str, MonkError]] = []
    for host in every_host(svc):
        try:
            dropped += service_of(svc, host).prune(key, retired_before=retired_before, wait=wait)
        except MonkError as exc:
            failed.append((host, exc))
    if failed:
        where, error = failed[0]
        raise type(error)(f"host {where!r}: {error}") from error
    return dropped


def every_host(svc: Pipeline) -> list[str]:
    """The local host, then every host of the fleet (any state), by name."""
    local = svc.hosts.local.name
    with svc.hosts.pools().system() as reg:
        rows = host_registry.list_all(reg)
    return [local] + [r.name for r in rows if not r.is_local]
