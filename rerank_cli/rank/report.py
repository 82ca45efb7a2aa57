"""Show an evaluation `Report`: a rich table for people, JSON for machines.

Owns presentation only (number formats, column layout, colours on a terminal); the numbers come
from `evaluation.py`.
"""

from __future__ import annotations

import json
import sys

from rerank_cli.rank.evaluation import Report


def to_json_text(report: Report, per_query: bool = False) -> str:
    return json.dumps(report.to_json(per_query), indent=2)


def _delta(value: float) -> str:
    text = f"{value:+.4f}"
    if value > 1e-12:
        return f"[green]{text}[/green]"
    if value < -1e-12:
        return f"[red]{text}[/red]"
    return text


def summary_table(report: Report):
    """Metric | run | baseline | difference | queries better/tied/worse."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("metric")
    table.add_column("run", justify="right")
    run = report.mean(report.run)
    if report.baseline is None:
        for label in report.labels:
            table.add_row(label, f"{run[label]:.4f}")
        return table
    base, diff = report.mean(report.baseline), report.diff()
    table.add_column("baseline", justify="right")
    table.add_column("diff", justify="right")
    table.add_column("better/tied/worse", justify="right")
    for label in report.labels:
        wins = "/".join(str(n) for n in report.wins(label))
        table.add_row(label, f"{run[label]:.4f}", f"{base[label]:.4f}", _delta(diff[label]), wins)
    return table


def per_query_table(report: Report):
    """One row per query: each metric of the run, and its difference to the baseline if any."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("qid")
    for label in report.labels:
        table.add_column(label, justify="right")
        if report.baseline is not None:
            table.add_column("diff", justify="right")
    for qid in report.queries:
        cells = [qid]
        for label in report.labels:
            cells.append(f"{report.run[qid][label]:.4f}")
            if report.baseline is not None:
                cells.append(_delta(report.run[qid][label] - report.baseline[qid][label]))
        table.add_row(*cells)
    return table


def print_report(report: Report, per_query: bool = False, as_json: bool = False) -> None:
    """Write the report to stdout: JSON, or tables (coloured only on a terminal) and notes."""
    if as_json:
        sys.stdout.write(to_json_text(report, per_query) + "\n")
        return
    from rich.console import Console

    # Piped output is not cut at 80 columns: a per-query table with a baseline is wider than that.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
    console.print(f"run:      {report.run_name}", markup=False)
    if report.baseline_name:
        console.print(f"baseline: {report.baseline_name}", markup=False)
    console.print(f"queries:  {len(report.queries)} with relevant judgements in {report.qrels_name}", markup=False)
    if per_query:
        console.print()
        console.print(per_query_table(report))
    console.print()
    console.print(summary_table(report))
    for note in report.notes:
        console.print(f"note: {note}", markup=False)
