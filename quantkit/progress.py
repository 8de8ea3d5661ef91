"""One look for every progress bar: rich, on stderr, bar + count + elapsed + remaining."""

from __future__ import annotations

from typing import Any


def progress_bar(label: str, unit: str) -> Any:
    """A ``rich.progress.Progress`` showing ``label``, a bar, done/total ``unit``, and times.

    ``label`` and ``unit`` are rich column templates, e.g. ``"[bold]{task.description}"`` or
    ``"batches  {task.fields[tokens_per_s]:,.0f} tokens/s"``. rich is imported only here.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
        TimeElapsedColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), transient=False,
    )


class StepProgress:
    """Progress of one long step of ``quantkit run`` (export, calibration, a build, ...).

    Why: those steps take minutes and used to print only "running ...". On a terminal
    (``tty=True``) a rich line on stderr shows the current phase, or a bar over batches once a
    total is known, with the elapsed time; it appears only when the step reports a phase or a
    total, so steps that draw their own bars (evaluation) are left alone. Elsewhere (logs, CI)
    a plain line goes to ``say``: at once for each new phase, and every ``every`` seconds while
    the step runs (a heartbeat with the phase, batch i/N and elapsed time). ``every=0``
    prints each batch as it completes instead, without a background thread.

    Use as a context manager; ``phase``, ``total`` and ``advance`` are safe to call from the
    step's own code (they are what ``export_model`` / ``run_calibration`` callbacks receive).
    """

    def __init__(self, step: str, say: Any, *, tty: bool = False, every: float = 10.0) -> None:
        import threading
        import time

        self.step, self.say, self.tty, self.every = step, say, tty, every
        self._clock = time.perf_counter
        self._started = self._clock()
        self._phase = "running"
        self._done = 0
        self._total: int | None = None
        self._unit = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Any = None
        self._live: Any = None
        self._task: Any = None

    # -- context ---------------------------------------------------------------------------------
    def __enter__(self) -> StepProgress:
        import threading

        self._started = self._clock()
        if not self.tty and self.every > 0:
            self._thread = threading.Thread(target=self._beat, name=f"progress {self.step}",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._live is not None:
            self._live.stop()

    # -- what the step reports -------------------------------------------------------------------
    def phase(self, text: str) -> None:
        """The step has started ``text`` (e.g. "exporting to ONNX"); resets any batch count."""
        with self._lock:
            self._phase, self._done, self._total = text, 0, None
        if self.tty:
            live = self._rich()
            if self._task is not None:
                live.remove_task(self._task)
            self._task = live.add_task(text, total=None)  # a new task: no bar until a total
        else:
            self.say(self.line())

    def total(self, count: int, unit: str = "batches") -> None:
        """The current phase will do ``count`` ``unit``."""
        with self._lock:
            self._total, self._unit, self._done = int(count), unit, 0
        if self.tty:
            live = self._rich()
            if self._task is None:
                self._task = live.add_task(self._phase, total=None)
            live.update(self._task, total=count, completed=0)

    def advance(self, done: int, *_: object) -> None:
        """``done`` of the total are finished (extra arguments, such as tokens, are ignored)."""
        with self._lock:
            self._done = int(done)
        if self.tty:
            if self._task is not None:
                self._rich().update(self._task, completed=done)
        elif self.every <= 0:
            self.say(self.line())

    def line(self) -> str:
        """The plain progress line: step, phase, i/N when counted, elapsed seconds."""
        with self._lock:
            count = f" {self._done}/{self._total} {self._unit}" if self._total else ""
            phase = self._phase
        return f"{self.step}: {phase}{count} ({self._clock() - self._started:.0f} s)"

    # -- internals -------------------------------------------------------------------------------
    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            self.say(self.line())

    def _rich(self) -> Any:
        """The rich display on stderr, started on first use."""
        if self._live is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self._live = Progress(SpinnerColumn(), TextColumn(f"{self.step}: "
                                                              "{task.description}"),
                                  BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                  console=Console(stderr=True), transient=True)
            self._live.start()
        return self._live
