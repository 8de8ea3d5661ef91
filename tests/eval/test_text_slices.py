"""``quantkit eval`` reads exactly its ``--split`` slice of a local file, and refuses text that an
engine's calibration read (issue: every slice used to evaluate the whole file)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from quantkit.errors import QuantkitError
from quantkit.eval.evaluate import EvalConfig, evaluate_engines
from quantkit.eval.latency import GridPoint

TEXT = Path(__file__).resolve().parents[2] / "calib_data" / "sample" / "calibration.txt"
CONFIG = EvalConfig(dataset=str(TEXT), split="test[50%:]", max_length=64, stride=64,
                    limit_tokens=640, batch_size=5, latency_grid=(GridPoint(1, 16),),
                    warmup=0, iterations=1, threads=1)


def test_disjoint_slices_are_different_text(llama_engine: Path) -> None:
    second = evaluate_engines([llama_engine], CONFIG)
    first = evaluate_engines([llama_engine], dataclasses.replace(CONFIG, split="test[:50%]"))
    whole = evaluate_engines([llama_engine], dataclasses.replace(CONFIG, split="test"))
    hashes = {r.dataset["text_sha256"] for r in (first, second, whole)}
    assert len(hashes) == 3
    assert first.dataset["tokens_sha256"] == whole.dataset["tokens_sha256"]  # same first tokens
    assert second.dataset["tokens_sha256"] != whole.dataset["tokens_sha256"]
    assert second.engines[0].perplexity != pytest.approx(first.engines[0].perplexity, rel=1e-6)
    total = len(TEXT.read_text().splitlines())
    assert second.dataset["read"]["records"] == {
        "first": total // 2, "last": total - 1, "count": total - total // 2, "total": total}
    labels = [r["label"] for r in second.dataset["roles"]]
    assert labels == [f"evaluation: calibration.txt records {total // 2}-{total - 1} of {total} "
                      "(test[50%:])"]


@pytest.fixture(scope="module")
def int8_engine_on_first_60(llama_engine: Path, tmp_path_factory: pytest.TempPathFactory
                            ) -> Path:
    """An INT8 engine of the same export, calibrated on the first 60 % of the file."""
    from quantkit.build import build_engine
    from quantkit.calib.run import CalibrationRequest, run_calibration

    onnx_dir = llama_engine.parent / "llama-export"
    root = tmp_path_factory.mktemp("slices")
    run_calibration(CalibrationRequest(onnx=onnx_dir, dataset=str(TEXT), split="train[:60%]",
                                       num_samples=4, seq_len=32, batch_size=4,
                                       method="minmax", tensors="quantizable"), root / "calib")
    engine = build_engine(root / "int8", precision="int8", onnx=onnx_dir,
                          table=root / "calib" / "table.json")
    return engine.path


def test_evaluation_on_calibration_text_is_refused(llama_engine: Path,
                                                   int8_engine_on_first_60: Path) -> None:
    with pytest.raises(QuantkitError) as error:
        evaluate_engines([llama_engine, int8_engine_on_first_60], CONFIG)
    message = str(error.value)
    assert "calibration of int8: calibration.txt records 0-" in message
    assert "(train[:60%])" in message and "(test[50%:])" in message
    allowed = evaluate_engines([llama_engine, int8_engine_on_first_60],
                               dataclasses.replace(CONFIG, allow_overlap=True))
    assert len(allowed.dataset["overlaps"]) == 1
    roles = {r["label"].split(":")[0] for r in allowed.dataset["roles"]}
    assert roles == {"evaluation", "calibration of int8"}
    apart = evaluate_engines([llama_engine, int8_engine_on_first_60],
                             dataclasses.replace(CONFIG, split="test[60%:]"))
    assert apart.dataset["overlaps"] == []
