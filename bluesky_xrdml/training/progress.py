"""Progress of a training loop: a rich bar on a terminal, plain lines otherwise.

``xrdml train ... > train.log`` (or a batch job, or a pipe) gets a line at the first
update, then at most one every ``every_s`` seconds, and one at the end, each with the
step or epoch, the loss, the time elapsed and an estimate of the time left:

    PQ-Net: step 96/3000 | mse 0.0213 bce 0.104 | 1m12s elapsed, ~36m18s left

On a terminal the same fields go to a rich progress bar instead. Every training loop of
the package reports through ``TrainingProgress``.
"""

from __future__ import annotations

import time


def is_terminal() -> bool:
    """Whether rich's console (standard output) is an interactive terminal."""
    from rich.console import Console

    return Console().is_terminal


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class TrainingProgress:
    """``with TrainingProgress("PQ-Net", total=steps, unit="step") as p: ...
    p.update(step, info="mse 0.01")``.

    ``log``: where plain lines go (``print``); ``enabled=False``: nothing at all;
    ``budget_s``: a time cap of the loop, which bounds the estimate of the time left;
    ``every_s``: the least time between two plain lines (``update(..., force=True)``
    writes one regardless, e.g. at the end of an epoch).
    """

    def __init__(self, label: str, total: float, unit: str = "step", *, log=print,
                 enabled: bool = True, budget_s: float | None = None, every_s: float = 15.0,
                 terminal: bool | None = None):
        self.label, self.total, self.unit = label, total, unit
        self.log, self.budget_s, self.every_s = log, budget_s, every_s
        terminal = is_terminal() if terminal is None else terminal
        self.bar_on = enabled and terminal
        self.plain = enabled and not terminal
        self.t0 = time.monotonic()
        self._last: float | None = None
        self._bar = self._task = None
        self.lines = 0

    def __enter__(self):
        if self.bar_on:
            from rich.progress import (
                BarColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn(f"[bold]{self.label}"), BarColumn(),
                                 TextColumn("{task.completed:g}/{task.total:g} " + self.unit),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                 TimeRemainingColumn(), transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total, info="")
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def eta(self, completed: float) -> float | None:
        """Seconds left at this pace (and within ``budget_s``), None before any progress."""
        elapsed = time.monotonic() - self.t0
        if completed <= 0:
            return None if self.budget_s is None else self.budget_s - elapsed
        left = elapsed * (self.total - completed) / completed
        if self.budget_s is not None:
            left = min(left, self.budget_s - elapsed)
        return max(left, 0.0)

    def update(self, completed: float, info: str = "", force: bool = False) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=min(completed, self.total), info=info)
        if not self.plain:
            return
        now = time.monotonic()
        if not (force or self._last is None or now - self._last >= self.every_s
                or completed >= self.total):
            return
        self._last = now
        eta = self.eta(completed)
        left = "" if eta is None else f", ~{duration(eta)} left"
        count = f"{completed:g}" if float(completed).is_integer() else f"{completed:.1f}"
        self.log(f"{self.label}: {self.unit} {count}/{self.total:g}"
                 f"{' | ' + info if info else ''} | {duration(now - self.t0)} elapsed{left}")
        self.lines += 1
