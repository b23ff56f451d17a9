"""What a person sees: a rich progress bar per epoch, eval lines, and a summary table.

``quiet`` replaces the bar with plain log lines (for batch jobs and CI logs). Runs side by side
in other processes (:mod:`dpl_zoo.side_by_side`) report through :class:`RemoteReporter`, which
sends what it would show; the parent's :class:`RunBoard` shows it, one progress line per run.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

_logger = logging.getLogger("dpl_zoo")


def _fmt(value, spec: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


class Reporter:
    def __init__(self, quiet: bool = False, console: Optional[Console] = None, silent: bool = False):
        self.quiet = quiet or silent
        self.silent = silent  # ranks other than 0 under torchrun say nothing
        self.console = console or Console(stderr=False)
        self._progress: Optional[Progress] = None
        self._task = None
        self._epoch = 0
        self._last: dict = {}
        # a bar only on a terminal; elsewhere (CI logs, files) one line per epoch
        self.live = not quiet and self.console.is_terminal

    def header(self, cfg, run) -> None:
        text = (f"{cfg.dpl.method} | {cfg.model} | {cfg.data.dataset}: {len(run.split.labeled)} labeled, "
                f"{len(run.split.unlabeled)} unlabeled, {len(run.classes)} classes | {cfg.epochs} epochs x "
                f"{run.steps_per_epoch} steps | output {run.out_dir}")
        if run.skipped_images:
            text += f" | skipped {run.skipped_images} unreadable images (--strict to fail instead)"
        self._say(text)

    def start_epoch(self, epoch: int, steps: int) -> None:
        self._epoch = epoch
        self._last = {}
        if not self.live:
            return
        self._progress = Progress(
            TextColumn(f"epoch {epoch + 1}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=self.console, transient=True)
        self._progress.start()
        self._task = self._progress.add_task("train", total=steps, stats="")

    def advance(self, live: Optional[dict] = None) -> None:
        """One step done; ``live`` statistics come only at logging steps (reading them costs a host sync)."""
        if live is not None:
            self._last = live
        if self._progress is not None:
            if live is None:
                self._progress.update(self._task, advance=1)
            else:
                self._progress.update(self._task, advance=1, stats=self._stats(live))

    def end_epoch(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._last:
            self._say(f"epoch {self._epoch + 1} done: {self._stats(self._last)}")

    @staticmethod
    def _stats(live: dict) -> str:
        parts = [f"loss {live['loss']:.3f}"]
        if "mask" in live:
            parts += [f"mask {live['mask']:.2f}", f"pl-acc {100 * live['pl_acc']:.1f}"]
        if "instance_acc" in live:   # pretraining: how often the positive key is the most similar
            parts.append(f"inst-acc {100 * live['instance_acc']:.1f}")
        return "  ".join(parts + [f"{live['img_s']:.0f} img/s"])

    def say(self, text: str) -> None:
        """One line, as the run's other lines (a header, a result)."""
        self._say(text)

    def eval_line(self, epoch: int, report: dict) -> None:
        parts = [f"epoch {epoch + 1}: top-1 {report['student']['top1']:.2f}"]
        if "teacher" in report:
            parts.append(f"teacher {report['teacher']['top1']:.2f}")
        pl = report.get("pseudo_labels")
        if pl:
            parts.append(f"pseudo-labels: acc {_fmt(pl['pl_acc'])} mask {pl['mask_rate']:.2f} "
                         f"KL(uniform) {_fmt(pl['pl_kl_uniform'], '.3f')}")
        self._say(" | ".join(parts))

    def _say(self, text: str) -> None:
        if self.silent:
            return
        if self.quiet:
            _logger.info(text)
        else:
            self.console.print(text)


class RemoteReporter(Reporter):
    """The reporter of a run in a child process: each event goes to ``send`` (a queue's ``put``) as
    ``(kind, key, ...)`` for the parent's :class:`RunBoard`; nothing is printed here."""

    def __init__(self, send, key: str):
        super().__init__(quiet=True)
        self.live = False
        self._send, self._key = send, key

    def header(self, cfg, run) -> None:
        self._send(("plan", self._key, cfg.epochs, run.steps_per_epoch))
        super().header(cfg, run)

    def start_epoch(self, epoch: int, steps: int) -> None:
        super().start_epoch(epoch, steps)
        self._send(("epoch", self._key, epoch, steps))

    def advance(self, live: Optional[dict] = None) -> None:
        super().advance(live)
        self._send(("step", self._key, None if live is None else self._stats(live)))

    def _say(self, text: str) -> None:
        self._send(("say", self._key, text))


class RunBoard:
    """Several runs at once, shown in one place: on a terminal one live progress line per run
    (epoch, bar over the whole run, step/total, the latest loss/mask/pl-acc, elapsed and remaining
    time) with each run's lines (header, epoch ends, evaluations) printed above the bars, prefixed
    by the run's name; elsewhere (CI logs, files) and with ``quiet`` those lines only, so output
    of runs never interleaves mid-line. Feed it the :class:`RemoteReporter` events with
    :meth:`handle`."""

    def __init__(self, names: Sequence[str], quiet: bool = False, console: Optional[Console] = None):
        self.quiet = quiet
        self.console = console or Console()
        self.live = not quiet and self.console.is_terminal
        self._plan: dict = {}
        self._progress: Optional[Progress] = None
        self._tasks: dict = {}
        if self.live:
            width = max(len(n) for n in names)
            self._progress = Progress(
                TextColumn(f"{{task.description:<{width}}}"), TextColumn("{task.fields[epoch]}"), BarColumn(),
                MofNCompleteColumn(), TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=self.console, refresh_per_second=4)   # few redraws: the cores are the runs'
            self._tasks = {n: self._progress.add_task(n, total=None, epoch="", stats="starting") for n in names}

    def __enter__(self) -> "RunBoard":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def handle(self, message: tuple) -> None:
        kind, key, *rest = message
        if kind == "say":
            self.say(key, rest[0])
        if self._progress is None:
            return
        task = self._tasks[key]
        if kind == "plan":
            self._plan[key] = epochs, steps = rest
            self._progress.update(task, total=epochs * steps, stats="")
        elif kind == "epoch":
            epoch, steps = rest
            epochs = self._plan.get(key, (epoch + 1, steps))[0]
            self._progress.update(task, completed=epoch * steps, epoch=f"epoch {epoch + 1}/{epochs}")
        elif kind == "step":
            if rest[0] is None:
                self._progress.advance(task)
            else:
                self._progress.update(task, advance=1, stats=rest[0])

    def done(self, key: str, summary: dict) -> None:
        """``key``'s run ended with ``summary``."""
        if self._progress is not None:
            epochs, steps = self._plan.get(key, (0, 0))   # no plan: a finished run, read back
            self._progress.update(self._tasks[key], completed=epochs * steps,
                                  stats=f"done: top-1 {_fmt(summary.get('top1'))}")

    def say(self, key: Optional[str], text: str) -> None:
        """A line of run ``key`` (prefixed by it), or of the whole command (``key`` None)."""
        line = text if key is None else f"{key}: {text}"
        if self.quiet:
            _logger.info(line)
        else:
            self.console.print(line, soft_wrap=True)


def summary_table(summaries: Sequence[dict], title: str = "dpl-zoo summary") -> Table:
    models = sorted({f"{s['model']} on {s['dataset']}, {s['labeled']} labels, {s['steps']} steps" for s in summaries})
    table = Table(title=title, caption="; ".join(models))
    for col in ("method", "top-1", "teacher", "PL acc", "mask", "PL KL", "max/min", "time s"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for s in summaries:
        table.add_row(s["method"], _fmt(s["top1"]), _fmt(s.get("teacher_top1")), _fmt(s.get("pl_acc")),
                      _fmt(s.get("mask_rate")), _fmt(s.get("pl_kl_uniform"), ".3f"),
                      _fmt(s.get("pl_max_min_ratio"), ".1f"), _fmt(s["seconds"], ".0f"))
    return table
