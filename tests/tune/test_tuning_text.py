"""Autotune's windows come from its own ``--split`` slice, and tuning on the calibration text is
refused unless allowed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from quantkit.errors import QuantkitError
from tests.conftest import SAMPLE


def test_windows_lie_inside_the_slice(tune_settings, tiny_tokenizer) -> None:
    from quantkit.data import resolve_text_source
    from quantkit.eval.text import load_evaluation_text
    from quantkit.tune.context import load_context

    settings = dataclasses.replace(tune_settings, dataset=str(SAMPLE / "evaluation.txt"),
                                   split="test[50%:]", search_windows=2, holdout_windows=2)
    context = load_context(settings)
    try:
        total = len((SAMPLE / "evaluation.txt").read_text().splitlines())
        assert context.data["read"]["records"]["first"] == total // 2
        text = load_evaluation_text(resolve_text_source(settings.dataset, split=settings.split))
        ids = np.asarray(tiny_tokenizer(text.text, add_special_tokens=False)["input_ids"])
        starts = set()
        for subset in context.subsets.values():
            for window in subset.reshape(-1, settings.max_length):
                start = int(np.flatnonzero(
                    np.all(np.lib.stride_tricks.sliding_window_view(ids, settings.max_length)
                           == window, axis=1))[0])
                starts.add(start)
        assert len(starts) == sum(len(s) // settings.max_length
                                  for s in context.subsets.values())  # disjoint windows
        head = load_evaluation_text(resolve_text_source(settings.dataset, split="test[:50%]"))
        assert head.text not in text.text
    finally:
        context.close()


def test_tuning_on_calibration_text_is_refused(tune_settings) -> None:
    from quantkit.tune.context import load_context

    # the fixture's table was calibrated on the whole of calibration.txt
    settings = dataclasses.replace(tune_settings, dataset=str(SAMPLE / "calibration.txt"),
                                   split="test[50%:]")
    with pytest.raises(QuantkitError, match=r"calibration: calibration.txt records 0-.*"
                                            r"overlaps tuning: calibration.txt records"):
        load_context(settings)
    context = load_context(dataclasses.replace(settings, allow_overlap=True))
    try:
        assert any(n.startswith("text overlap allowed: calibration") for n in context.notes)
    finally:
        context.close()
