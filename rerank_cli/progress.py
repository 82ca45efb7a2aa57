"""What the user sees on stderr while a run goes: decisions, a progress bar, a summary line.

A rich progress bar (pairs, pairs/s, ETA) when stderr is a terminal, a plain line every few seconds
otherwise, nothing but errors with `quiet`. Thread-safe enough for a parent that aggregates workers.
"""

from __future__ import annotations

import sys
import time

PLAIN_EVERY_S = 10.0


class Reporter:
    def __init__(self, quiet: bool = False, stream=None, force_plain: bool = False):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.rich = not quiet and not force_plain and self.stream.isatty()
        self.done = 0
        self.total: int | None = None
        self.started = time.perf_counter()
        self._last_plain = self.started
        self._progress = None
        self._task = None

    def info(self, message: str) -> None:
        """A decision or warning worth one line ("cpu: fp32 (...)")."""
        if self.quiet:
            return
        if self._progress is not None:
            self._progress.console.print(f"rerank: {message}", markup=False, highlight=False)
        else:
            print(f"rerank: {message}", file=self.stream, flush=True)

    def start(self, total: int | None = None) -> None:
        self.total = total
        self.started = self._last_plain = time.perf_counter()
        if not self.rich:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("scoring"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} pairs/s"), TimeRemainingColumn(),
            console=Console(file=self.stream), transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task("score", total=total, rate="-")

    def set_total(self, total: int) -> None:
        self.total = total
        if self._progress is not None:
            self._progress.update(self._task, total=total)

    def advance(self, n: int) -> None:
        self.done += n
        if self._progress is not None:
            self._progress.update(self._task, advance=n, rate=f"{self.rate():.1f}")
        elif not self.quiet and time.perf_counter() - self._last_plain >= PLAIN_EVERY_S:
            self._last_plain = time.perf_counter()
            of = f" of {self.total}" if self.total else ""
            self.info(f"{self.done}{of} pairs, {self.rate():.1f} pairs/s")

    def rate(self) -> float:
        return self.done / max(1e-9, time.perf_counter() - self.started)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
