from __future__ import annotations

import json

import pytest

from quantkit.calib.table import CalibrationTable
from quantkit.errors import QuantkitError


def make_table(**kw) -> CalibrationTable:
    fields = dict(method="entropy", params={"start_bin": 128},
                  amax={"a": 0.99634, "b/c:0": 255.059},
                  model_hash="ab" * 32, data={"dataset": "sample", "seq_len": 64},
                  skipped={"mask": "mask: holds -3.4e+38"}, num_samples=8, num_tokens=512)
    fields.update(kw)
    return CalibrationTable(**fields)


def test_scale_is_amax_over_127():
    t = make_table()
    assert t.scale("a") == pytest.approx(0.99634 / 127)
    assert "a" in t and "mask" not in t and len(t) == 2
    with pytest.raises(QuantkitError, match="skipped: mask"):
        t.scale("mask")
    with pytest.raises(QuantkitError, match="not in the calibration table"):
        t.scale("nope")


def test_save_load_round_trip(tmp_path):
    t = make_table()
    path = tmp_path / "table.json"
    t.save(path)
    again = CalibrationTable.load(path)
    assert again == t
    assert json.loads(path.read_text())["format"] == "quantkit-calibration-table"


def test_check_model():
    t = make_table()
    t.check_model("ab" * 32)
    t.check_model(None)  # nothing to compare against
    with pytest.raises(QuantkitError, match="different model"):
        t.check_model("cd" * 32)


@pytest.mark.parametrize("content,match", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "not a quantkit calibration table"),
    ('{"format": "quantkit-calibration-table", "version": 99}', "table version 99"),
    ('{"format": "quantkit-calibration-table", "version": 1, "amax": {}}', "malformed"),
    ('{"format": "quantkit-calibration-table", "version": 1, "method": "entropy", '
     '"amax": {"x": -1.0}}', "amax of 'x' is -1.0"),
    ('{"format": "quantkit-calibration-table", "version": 1, "method": "entropy", '
     '"amax": {"x": "big"}}', "not a number"),
])
def test_bad_files_give_clear_errors(tmp_path, content, match):
    path = tmp_path / "table.json"
    path.write_text(content)
    with pytest.raises(QuantkitError, match=match):
        CalibrationTable.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(QuantkitError, match="does not exist"):
        CalibrationTable.load(tmp_path / "none.json")


def test_invalid_tables_are_refused():
    with pytest.raises(QuantkitError, match="finite number"):
        make_table(amax={"a": float("nan")})
    with pytest.raises(QuantkitError, match="both calibrated and skipped"):
        make_table(skipped={"a": "why"})
