"""How a database is cloned from its template, pure: the one decision every clone uses.

PostgreSQL (15+) clones with ``STRATEGY WAL_LOG`` (every page read through shared buffers and
written again into the WAL) or ``STRATEGY FILE_COPY`` (the files copied, no WAL, but two forced
checkpoints per clone). PostgreSQL 18's ``file_copy_method = clone`` makes FILE_COPY's copy a
reflink on a copy-on-write filesystem (XFS with reflink, btrfs): a metadata operation, whatever
the size. Which is fastest depends on the host (can it reflink?) and the template's size; see
docs/clone-strategy.md for the measurements behind the rules below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

STRATEGY_SETTINGS = ("auto", "wal_log", "file_copy")
"""The values of MONK_CLONE_STRATEGY and of ``clone_strategy`` in template.json."""

StrategySetting = Literal["auto", "wal_log", "file_copy"]
Strategy = Literal["wal_log", "file_copy"]

DEFAULT_FILE_COPY_ABOVE = 32 * 1024 * 1024
"""Bytes of template from which FILE_COPY beats WAL_LOG without reflink. Measured on this
project's VM (ext4, durable embedded PostgreSQL 18): at 8 and 17 MB WAL_LOG took 40-58 ms
against 75-82 ms for FILE_COPY (its checkpoints cost more than the copy); at 38 MB they were
even (105-114 ms against 95-109 ms); at 99 MB FILE_COPY took 93 ms against 185-294 ms."""

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


@dataclass(frozen=True)
class CloneChoice:
    """What ``CREATE DATABASE … TEMPLATE`` is told: its STRATEGY and, for FILE_COPY on a server
    that has it, ``file_copy_method`` (``clone`` or ``copy``: said explicitly either way, so
    that a server whose configuration says otherwise does what was decided)."""

    strategy: Strategy
    clone: bool
    reason: str

    @property
    def label(self) -> str:
        """``wal_log``, ``file_copy`` or ``file_copy+clone``: how bench and logs name it."""
        return "file_copy+clone" if self.clone else self.strategy


def parse_strategy_setting(value: str) -> StrategySetting:
    """``auto``, ``wal_log`` or ``file_copy`` (any case); anything else is a ValueError naming
    the allowed values (the caller turns it into its config error, naming where it was)."""
    text = value.strip().lower()
    if text == "auto":
        return "auto"
    if text == "wal_log":
        return "wal_log"
    if text == "file_copy":
        return "file_copy"
    raise ValueError(
        f"{value!r} is not a clone strategy; use one of {', '.join(STRATEGY_SETTINGS)}"
    )


def parse_size(text: str) -> int:
    """``512MB``, ``2G``, ``64MiB``, ``1048576``: bytes (binary units). ValueError otherwise."""
    found = _SIZE.match(text)
    if found is None:
        raise ValueError(f"{text!r} is not a size: give a number with B, kB, MB, GB or TB")
    unit = (found.group(2) or "").lower().replace("i", "").rstrip("b") or ""
    if unit == "" and (found.group(2) or "").lower() not in ("", "b"):
        raise ValueError(f"{text!r} is not a size: give a number with B, kB, MB, GB or TB")
    return int(float(found.group(1)) * _UNITS[unit])


def format_size(size: int) -> str:
    """Bytes as a short text: ``512MB``, ``1.5GB``, ``800kB``."""
    for unit, factor in (("TB", 1024**4), ("GB", 1024**3), ("MB", 1024**2), ("kB", 1024)):
        if size >= factor:
            value = size / factor
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{size}B"


def choose(
    *,
    setting: StrategySetting,
    template_setting: StrategySetting | None,
    clone_available: bool,
    size_bytes: int | None,
    file_copy_above: int,
) -> CloneChoice:
    """The strategy of one clone.

    ``template_setting`` (template.json's ``clone_strategy``, recorded with the build) wins over
    ``setting`` (MONK_CLONE_STRATEGY) unless it is ``auto`` or absent. ``file_copy`` uses the
    host's reflink when it has one. ``auto``: WAL_LOG below ``file_copy_above`` bytes of
    template, FILE_COPY from it on, with clone where the host can reflink. Every FILE_COPY
    forces two checkpoints, whose cost does not shrink with the template: measured on this
    project's VM, a reflink clone of an 11 MB template took 0.4-0.7 s against 0.1 s for
    WAL_LOG, while for 630 MB it took 0.4 s against 4.1 s (docs/clone-strategy.md). An unknown
    size (a build made before sizes were recorded) keeps PostgreSQL's default, WAL_LOG, unless
    the host clones files (then the size costs nothing).
    """
    forced = template_setting if template_setting not in (None, "auto") else setting
    source = (
        "template.json clone_strategy"
        if template_setting not in (None, "auto")
        else "MONK_CLONE_STRATEGY"
    )
    if forced == "wal_log":
        return CloneChoice("wal_log", False, f"{source}=wal_log")
    if forced == "file_copy":
        how = " with reflink (the host can clone files)" if clone_available else ""
        return CloneChoice("file_copy", clone_available, f"{source}=file_copy{how}")
    if size_bytes is None:
        if clone_available:
            return CloneChoice("file_copy", True, "auto: size unknown, the host clones files")
        return CloneChoice("wal_log", False, "auto: the build's size is unknown")
    if size_bytes >= file_copy_above:
        how = ", the host clones files" if clone_available else ""
        return CloneChoice(
            "file_copy",
            clone_available,
            f"auto: {format_size(size_bytes)} template, at least "
            f"{format_size(file_copy_above)}{how}",
        )
    return CloneChoice(
        "wal_log",
        False,
        f"auto: {format_size(size_bytes)} template, under {format_size(file_copy_above)}",
    )


@dataclass(frozen=True)
class ClonePoint:
    """One template's clone times (p50 ms) in one ``monk bench --template-size`` run:
    WAL_LOG, and the FILE_COPY ``auto`` would use on that host (with reflink where it can)."""

    size_bytes: int
    wal_log_ms: float
    file_copy_ms: float


@dataclass(frozen=True)
class ThresholdSuggestion:
    """The ``MONK_CLONE_FILE_COPY_ABOVE`` a run's measurements ask for, and why."""

    file_copy_above: int
    reason: str

    @property
    def setting(self) -> str:
        return format_size(self.file_copy_above) if self.file_copy_above else "0"


def suggest_threshold(small: ClonePoint, large: ClonePoint) -> ThresholdSuggestion:
    """Where FILE_COPY starts to beat WAL_LOG on this host, from two templates measured in one
    run: each strategy's time taken as linear in the template's size between the two (WAL_LOG
    copies every byte through the WAL; FILE_COPY pays two checkpoints, then copies or
    reflinks). FILE_COPY already faster on the small one: 0 (tmpfs, where a checkpoint's
    fsyncs cost nothing). WAL_LOG still faster on the large one: the large size (no crossing
    seen below it). Else the crossing, rounded up to a MB."""
    if large.size_bytes <= small.size_bytes:
        raise ValueError("the large template must be larger than the small one")
    if small.file_copy_ms <= small.wal_log_ms:
        return ThresholdSuggestion(
            0, f"FILE_COPY was faster already at {format_size(small.size_bytes)}"
        )
    if large.file_copy_ms >= large.wal_log_ms:
        return ThresholdSuggestion(
            large.size_bytes,
            f"WAL_LOG was faster still at {format_size(large.size_bytes)}",
        )
    span = large.size_bytes - small.size_bytes
    gap = small.file_copy_ms - small.wal_log_ms  # > 0: what FILE_COPY must win back
    closing = (large.wal_log_ms - small.wal_log_ms) - (large.file_copy_ms - small.file_copy_ms)
    crossing = small.size_bytes + gap / closing * span
    mb = 1024 * 1024
    rounded = int(-(-crossing // mb) * mb)
    return ThresholdSuggestion(
        rounded,
        f"the two strategies cross at ~{format_size(rounded)} between the "
        f"{format_size(small.size_bytes)} and {format_size(large.size_bytes)} templates",
    )
