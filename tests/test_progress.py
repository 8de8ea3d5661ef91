"""StepProgress: what a long step of `quantkit run` prints when stdout is not a terminal."""

from __future__ import annotations

import threading

from quantkit.progress import StepProgress


def test_plain_lines_for_phases_and_batches():
    lines: list[str] = []
    with StepProgress("calibrate", lines.append, every=0) as step:
        step.phase("reading the text")
        step.phase("collecting activation statistics")
        step.total(3, "batches")
        for i in (1, 2, 3):
            step.advance(i, 1000 * i)  # extra arguments (tokens) are ignored
    heads = [line.rsplit(" (", 1)[0] for line in lines]
    assert heads == ["calibrate: reading the text", "calibrate: collecting activation statistics",
                     "calibrate: collecting activation statistics 1/3 batches",
                     "calibrate: collecting activation statistics 2/3 batches",
                     "calibrate: collecting activation statistics 3/3 batches"]
    assert all(line.endswith(" s)") for line in lines)


def test_heartbeat_thread_ends_with_the_step():
    lines: list[str] = []
    with StepProgress("export", lines.append, every=3600) as step:
        step.phase("exporting to ONNX")
        beat = step._thread
        assert beat is not None and beat.is_alive()
    assert not beat.is_alive()
    assert not any(t.name == "progress export" for t in threading.enumerate())
    assert step.line().startswith("export: exporting to ONNX (")


def test_terminal_mode_draws_on_stderr_not_through_say():
    lines: list[str] = []
    with StepProgress("export", lines.append, tty=True) as step:
        step.phase("exporting to ONNX")
        step.total(2)
        step.advance(1)
    assert lines == [] and step._thread is None
