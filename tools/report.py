"""Statistics and result tables shared by the benchmarks in tools/.

Why it exists. Every benchmark repeats measurements and reports medians and 95th percentiles,
prints one table of (label, value, target, verdict) rows, lists what failed, optionally writes
the same figures as JSON, and ends with the same exit status convention (0 all ran, 1 a part
failed, 130 interrupted). Doing that in one place keeps the tools' outputs alike, so runs of
different tools read the same way. It imports nothing from the other tools: the harness that
runs file systems (tools/harness.py) builds on it, not the other way round.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def say(msg: str) -> None:
    """Print a progress or result line at once (output is often piped to a log)."""
    print(msg, flush=True)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def p95(values: list[float]) -> float | None:
    """The 95th percentile (inclusive method); the only value when there is one."""
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


@dataclass
class Report:
    """Table rows (label, value, target, verdict), the raw figures for --json, what failed,
    and the load average (1 min) at the start and end of every part."""

    rows: list[tuple[str, str, str, str]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    loads: dict[str, list[float]] = field(default_factory=dict)

    def row(self, label: str, value: str, target: str = "", ok: bool | None = None) -> None:
        """A result row, also printed at once; `ok` None: no target, no verdict."""
        verdict = "" if ok is None else ("ok" if ok else "MISS")
        self.rows.append((label, value, target, verdict))
        say(f"  {label}: {value}" + (f"  [{target}] {verdict}" if target else ""))

    def section(self, title: str) -> None:
        self.rows.append((title, "", "", ""))


def print_table(rep: Report) -> None:
    label_w = max((len(r[0]) for r in rep.rows if r[1]), default=20) + 2
    value_w = max((len(r[1]) for r in rep.rows if r[2]), default=20) + 2
    for label, value, target, verdict in rep.rows:
        if not value:
            say(f"\n{label}")
            say("-" * (label_w + value_w + 20))
            continue
        line = f"  {label:<{label_w}}{value}"
        if target:
            line = f"{line:<{label_w + value_w + 2}}[{target}] {verdict}"
        say(line.rstrip())


def conclude(rep: Report, args: argparse.Namespace, *, machine: dict[str, Any], elapsed: float,
             interrupted: bool, units: str, extra: dict[str, Any] | None = None) -> int:
    """Print the table, the load averages, `units` and the failures; write --json if asked;
    return the exit status (0 every part ran, 1 one failed, 130 interrupted)."""
    print_table(rep)
    say("\nload average (1 min) at the start and end of each part: " + ", ".join(
        f"{k} {'-'.join(f'{x:.2f}' for x in v)}" for k, v in rep.loads.items()))
    say(f"total {elapsed:.0f} s; {units}")
    for err in rep.errors:
        say(f"FAILED {err}")
    if args.json:
        doc = {"machine": machine, "args": {k: v for k, v in vars(args).items() if k != "json"},
               "results": rep.data, "table": rep.rows, "loadavg": rep.loads,
               "errors": rep.errors, "seconds": elapsed, "interrupted": interrupted,
               **(extra or {})}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        say(f"wrote {args.json}")
    if interrupted:
        return 130
    return 1 if rep.errors else 0
