"""The report's numbers from the fixed results fixtures: Δppl, speedups, references, the reference
shape and Pareto membership. Expected values are computed here from the fixture's raw numbers."""

from __future__ import annotations

import pytest

from quantkit.report.inputs import read_results
from quantkit.report.tables import build_tables
from tests.report.helpers import ORT, TRT, altered, engine


def rows_by_label(tables):
    return {e["label"]: e for e in tables["engines"]}


@pytest.fixture(scope="module")
def trt():
    return build_tables([read_results(TRT)])


@pytest.fixture(scope="module")
def merged():
    return build_tables([read_results(TRT), read_results(ORT)])


def test_single_file_reference_shape_is_the_largest_common_one(trt):
    # Every engine measured 1x128, 1x512 and 8x512: the tie goes to the most tokens.
    assert trt["reference_shape"] == {"batch": 8, "seq": 512}


def test_deltas_against_fp32_and_fp16(trt):
    rows = rows_by_label(trt)
    fp32, fp16 = 20.9183, 20.9212
    for name, ppl in [("fp32", 20.9183), ("fp16", 20.9212), ("int8", 21.7342),
                      ("int8-minmax", 22.4871), ("mixed", 21.1029)]:
        row = rows[name]
        assert row["perplexity"] == ppl
        assert row["delta_vs_fp32"]["abs"] == pytest.approx(ppl - fp32, abs=1e-12)
        assert row["delta_vs_fp32"]["pct"] == pytest.approx(100 * (ppl - fp32) / fp32, rel=1e-12)
        assert row["delta_vs_fp16"]["abs"] == pytest.approx(ppl - fp16, abs=1e-12)
        assert row["delta_vs_fp16"]["pct"] == pytest.approx(100 * (ppl - fp16) / fp16, rel=1e-12)
    assert rows["mixed"]["delta_vs_fp32"]["pct"] == pytest.approx(0.882481, abs=1e-6)
    assert rows["fp32"]["delta_vs_fp32"] == {"abs": 0.0, "pct": 0.0}


def test_speedups_at_every_shape_and_at_the_reference_shape(trt):
    rows = rows_by_label(trt)
    p50 = {  # fixture p50 in ms at 1x128, 1x512, 8x512
        "fp32": (1.92, 6.10, 38.4), "fp16": (1.05, 3.02, 17.9), "int8": (0.88, 2.21, 11.6),
        "int8-minmax": (0.90, 2.30, 11.9), "mixed": (0.96, 2.48, 13.4),
    }
    for name, values in p50.items():
        by_shape = {(r["batch"], r["seq"]): r for r in rows[name]["latency"]}
        for shape, mine, ref32, ref16 in zip([(1, 128), (1, 512), (8, 512)], values,
                                             p50["fp32"], p50["fp16"], strict=True):
            assert by_shape[shape]["speedup_vs_fp32"] == pytest.approx(ref32 / mine, rel=1e-12)
            assert by_shape[shape]["speedup_vs_fp16"] == pytest.approx(ref16 / mine, rel=1e-12)
    at = rows["int8"]["at_reference_shape"]
    assert at["p50_ms"] == 11.6
    assert at["p99_ms"] == pytest.approx(11.6 * 1.08, rel=1e-4)
    assert at["speedup_vs_fp32"] == pytest.approx(38.4 / 11.6)
    assert at["speedup_vs_fp16"] == pytest.approx(17.9 / 11.6)
    assert at["tokens_per_s"] == pytest.approx(8 * 512 / (11.6 * 1.01 / 1e3), rel=1e-5)


def test_pareto_membership_single_file(trt):
    assert trt["pareto"]["front"] == ["int8", "mixed", "fp16", "fp32"]
    assert {e["label"]: e["pareto"] for e in trt["engines"]} == {
        "fp32": True, "fp16": True, "int8": True, "int8-minmax": False, "mixed": True}
    assert trt["pareto"]["points"]["int8-minmax"] == {
        "p50_ms": 11.9, "delta_pct": pytest.approx(100 * (22.4871 - 20.9183) / 20.9183)}
    assert trt["pareto"]["excluded"] == []


def test_merged_files_labels_reference_shape_and_front(merged):
    rows = rows_by_label(merged)
    assert list(rows) == ["fp32@results-trt-h100", "fp16", "int8@results-trt-h100",
                          "int8-minmax", "mixed", "fp32@results-ort-cpu", "int8@results-ort-cpu"]
    # 1x128 and 1x512 are measured by all 7 engines, 8x512 by 5: the tie goes to more tokens.
    assert merged["reference_shape"] == {"batch": 1, "seq": 512}
    assert merged["pareto"]["front"] == ["int8@results-trt-h100", "mixed", "fp16",
                                         "fp32@results-trt-h100"]


def test_merged_references_stay_on_their_machine_for_speed(merged):
    rows = rows_by_label(merged)
    cpu_int8 = rows["int8@results-ort-cpu"]
    assert cpu_int8["reference"] == {"fp32": "fp32@results-ort-cpu", "fp16": "fp16"}
    # Δ against the CPU FP32 engine (same machine and backend preferred) ...
    assert cpu_int8["delta_vs_fp32"]["pct"] == pytest.approx(
        100 * (21.5517 - 20.9181) / 20.9181, rel=1e-12)
    # ... and against the only FP16 engine, which is of the same model on a GPU.
    assert cpu_int8["delta_vs_fp16"]["abs"] == pytest.approx(21.5517 - 20.9212, abs=1e-12)
    at = cpu_int8["at_reference_shape"]
    assert at["speedup_vs_fp32"] == pytest.approx(151.0 / 71.3)
    assert at["speedup_vs_fp16"] is None  # a GPU latency is no reference for a CPU one
    assert rows["int8@results-trt-h100"]["at_reference_shape"]["speedup_vs_fp32"] == \
        pytest.approx(6.10 / 2.21)


def test_fp16_more_accurate_than_fp32_pushes_fp32_off_the_front(tmp_path):
    def change(data):
        engine(data, "fp16")["perplexity"] = 20.9000
    path = altered(TRT, tmp_path / "results.json", change)
    tables = build_tables([read_results(path)])
    rows = rows_by_label(tables)
    assert rows["fp16"]["delta_vs_fp32"]["pct"] == pytest.approx(100 * (20.9 - 20.9183) / 20.9183)
    assert tables["pareto"]["front"] == ["int8", "mixed", "fp16"]
    assert rows["fp32"]["pareto"] is False


def test_engines_without_reference_or_latency_are_left_out_of_the_plot(tmp_path):
    def change(data):
        engine(data, "mixed")["latency"] = []
        engine(data, "int8")["source_model_hash"] = "another-model"
    path = altered(TRT, tmp_path / "results.json", change)
    tables = build_tables([read_results(path)])
    rows = rows_by_label(tables)
    assert rows["int8"]["delta_vs_fp32"] is None and rows["int8"]["reference"]["fp32"] is None
    assert rows["mixed"]["at_reference_shape"] is None
    reasons = {x["engine"]: x["reason"] for x in tables["pareto"]["excluded"]}
    assert reasons == {
        "int8": "no FP32 engine of the same model to measure Δppl from",
        "mixed": "no latency measured at batch 8 × seq 512",
    }
    assert "int8" not in tables["pareto"]["points"] and "mixed" not in tables["pareto"]["points"]
    # Without int8, int8-minmax (11.9 ms, +7.5%) is the fastest plotted engine: on the front.
    assert tables["pareto"]["front"] == ["int8-minmax", "fp16", "fp32"]


def test_reference_shape_prefers_the_shape_most_engines_have(tmp_path):
    def change(data):
        for e in data["engines"]:
            e["latency"] = [r for r in e["latency"] if (r["batch"], r["seq"]) != (8, 512)]
        engine(data, "fp32")["latency"] = engine(data, "fp32")["latency"][:1]  # 1x128 only
    path = altered(TRT, tmp_path / "results.json", change)
    tables = build_tables([read_results(path)])
    assert tables["reference_shape"] == {"batch": 1, "seq": 128}
