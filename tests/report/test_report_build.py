"""build_report end to end on the fixtures: the three files, their numbers, self-containment,
calibration, and refusing to overwrite."""

from __future__ import annotations

import base64
import json
import re
import shutil

import pytest

from quantkit.errors import QuantkitError
from quantkit.report import REPORT_SCHEMA, build_report
from tests.report.helpers import CALIB, ORT, TRT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "out"
    return build_report([TRT, ORT], out, calibration=CALIB, command="quantkit report (test)")


def test_writes_the_three_files_and_the_plots(report):
    names = sorted(p.name for p in report.directory.iterdir())
    assert names == ["calibration-histogram.png", "pareto.png", "precision-map-mixed.png",
                     "report.html", "report.json", "report.md"]
    for name in names:
        if name.endswith(".png"):
            assert (report.directory / name).read_bytes().startswith(PNG_MAGIC)
    assert not [p for p in report.directory.parent.iterdir() if p.name.startswith(".")]


def test_report_json_is_versioned_and_holds_the_table(report):
    data = json.loads(report.json.read_text())
    assert data["schema"] == REPORT_SCHEMA
    assert data["reference_shape"] == {"batch": 1, "seq": 512}
    assert data["pareto"]["front"] == ["int8@results-trt-h100", "mixed", "fp16",
                                       "fp32@results-trt-h100"]
    rows = {e["label"]: e for e in data["engines"]}
    assert rows["mixed"]["pareto"] is True and rows["int8-minmax"]["pareto"] is False
    assert rows["mixed"]["at_reference_shape"]["speedup_vs_fp32"] == pytest.approx(6.10 / 2.48)
    assert [s["path"] for s in data["sources"]] == [str(TRT), str(ORT)]
    assert data["sources"][1]["commands"][0].startswith("quantkit eval --engine engines/ort-fp32")
    assert data["generator"]["command"] == "quantkit report (test)"
    maps = {m["engine"]: m for m in data["precision_maps"]}
    assert set(maps) == {"int8@results-trt-h100", "int8-minmax", "mixed", "int8@results-ort-cpu"}
    assert maps["mixed"]["image"] == "precision-map-mixed.png"
    assert maps["int8@results-trt-h100"]["map"]["uniform"] == "int8"
    assert "is not here" in maps["int8-minmax"]["note"]
    calib = data["calibration"]
    assert calib["method"] == "entropy" and calib["num_samples"] == 128
    assert calib["num_tokens"] == 8192 and calib["num_tensors"] == 242
    top = calib["largest_amax"]
    assert len(top) == 10 and [t["amax"] for t in top] == sorted((t["amax"] for t in top),
                                                                  reverse=True)
    table = json.loads((CALIB / "table.json").read_text())["amax"]
    assert top[0] == {"tensor": max(table, key=table.get), "amax": max(table.values())}
    assert calib["histogram"]["tensor"] == top[0]["tensor"]
    assert calib["histogram"]["image"] == "calibration-histogram.png"
    assert calib["histogram"]["values"] == 8192  # every synthetic value was histogrammed


def test_markdown_numbers(report):
    md = report.markdown.read_text()
    row = next(line for line in md.splitlines() if line.startswith("| **mixed**"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["**mixed**", "tensorrt", "mixed", "68.0%", "21.103", "+0.185 (+0.88%)",
                     "+0.182 (+0.87%)", "2.48", "2.68", "204,408", "2.46×", "1.22×",
                     "195.6 MiB", "yes"]
    cpu = next(line for line in md.splitlines() if line.startswith("| int8@results-ort-cpu |"))
    assert "| 2.12× | — |" in cpu  # no FP16 speedup across machines
    assert "batch 1 × seq 512" in md
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (report.directory / image).is_file()
    assert "quantkit eval --engine engines/trt-fp32" in md
    assert "NVIDIA H100 80GB HBM3" in md and "AMD EPYC 7B13 (2 cores)" in md
    assert "engines/trt-int8-minmax" in md  # the note on the missing engine directory


def test_html_is_self_contained(report):
    html = report.html.read_text()
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", html, flags=re.I)
    assert refs, "the report has images"
    assert all(r.startswith("data:image/png;base64,") for r in refs), refs
    assert not re.search(r"<(script|link|iframe|object|embed)\b", html, flags=re.I)
    assert "url(" not in html and "@import" not in html
    images = {p.name: p.read_bytes() for p in report.directory.glob("*.png")}
    inline = [base64.b64decode(r.split(",", 1)[1]) for r in refs]
    assert sorted(inline) == sorted(images.values())


def test_single_file_without_calibration(tmp_path):
    out = build_report([TRT], tmp_path / "r")
    data = out.data
    assert data["calibration"] is None
    assert data["reference_shape"] == {"batch": 8, "seq": 512}
    assert "No calibration directory was given" in out.markdown.read_text()


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(QuantkitError, match="already exists"):
        build_report([TRT], out)
    assert (out / "old.txt").read_text() == "keep me"
    build_report([TRT], out, force=True)
    assert not (out / "old.txt").exists() and (out / "report.html").is_file()


def test_errors_leave_no_output(tmp_path):
    out = tmp_path / "r"
    with pytest.raises(QuantkitError, match="does not exist"):
        build_report([TRT, tmp_path / "missing.json"], out)
    with pytest.raises(QuantkitError, match="holds no table.json"):
        build_report([TRT], out, calibration=tmp_path)
    with pytest.raises(QuantkitError, match="not in the calibration table"):
        build_report([TRT], out, calibration=CALIB, histogram_tensor="/no/such/tensor")
    assert list(tmp_path.iterdir()) == []


def test_calibration_without_stats_says_what_is_missing(tmp_path):
    calib = tmp_path / "calib"
    calib.mkdir()
    shutil.copy(CALIB / "table.json", calib / "table.json")
    out = build_report([TRT], tmp_path / "r", calibration=calib,
                       histogram_tensor="/model/layers.0/input_layernorm/Mul_1_output_0")
    hist = out.data["calibration"]["histogram"]
    assert hist["image"] is None and "holds no activation statistics" in hist["note"]
    assert hist["tensor"] == "/model/layers.0/input_layernorm/Mul_1_output_0"
    assert not (out.directory / "calibration-histogram.png").exists()
    assert "No histogram for /model/layers.0/input_layernorm/Mul_1_output_0" in \
        out.markdown.read_text()


def test_precision_map_prefers_the_plan_as_built(tmp_path):
    """ONNX Runtime records ``plan_as_built`` when ops fell back to fp32: that is what ran."""
    manifest = json.loads((CALIB.parent / "engines" / "trt-mixed" / "manifest.json").read_text())
    as_built = json.loads(json.dumps(manifest["inputs"]["plan"]))
    for d in as_built["decisions"]:
        if d["node"] == "/model/layers.5/mlp/up_proj/MatMul":
            d["precision"], d["rule"] = "fp32", "fallback"
    manifest["plan_as_built"] = as_built
    engine_dir = tmp_path / "engines" / "trt-mixed"
    engine_dir.mkdir(parents=True)
    (engine_dir / "manifest.json").write_text(json.dumps(manifest))
    results = tmp_path / "results.json"
    shutil.copy(TRT, results)
    out = build_report([results], tmp_path / "r")
    maps = {m["engine"]: m for m in out.data["precision_maps"]}
    pmap = maps["mixed"]["map"]
    assert maps["mixed"]["plan"] == "plan_as_built"
    up = [c["name"] for c in pmap["columns"]].index("up")
    assert pmap["grid"][5][up] == "fp32" and pmap["grid"][4][up] == "int8"
    assert pmap["linear_counts"] == {"int8": 206, "fp16": 64, "fp32": 1}
    # The other engines' directories are not beside this copy: each says so.
    assert "is not here" in maps["int8"]["note"]


def test_no_fp32_engine_and_no_latency_still_report(tmp_path):
    from tests.report.helpers import altered

    def change(data):
        data["engines"] = [e for e in data["engines"] if e["precision"] != "fp32"]
        for e in data["engines"]:
            e["latency"] = []
        data["reference"]["fp32"] = None
    results = altered(TRT, tmp_path / "results.json", change)
    out = build_report([results], tmp_path / "r")
    assert out.data["reference_shape"] is None
    assert out.data["pareto"]["front"] == [] and out.data["pareto"]["points"] == {}
    assert out.data["notes"] == ["No engine has both a Δppl against FP32 and a latency at the "
                                 "reference shape, so there is no Pareto plot."]
    assert not (out.directory / "pareto.png").exists()
    md = out.markdown.read_text()
    assert "No latency was measured." in md
    row = next(line for line in md.splitlines() if line.startswith("| int8 |"))
    assert "| 21.734 | — | +0.813 (+3.89%) | — | — | — | — | — |" in row


def test_dataset_section_shows_each_roles_text():
    from quantkit.report.build import _dataset_section
    from quantkit.report.document import to_markdown

    dataset = {"source": {"kind": "local", "name": "/data/wiki.test.raw"}, "split": "test",
               "roles": [{"label": "evaluation: wiki.test.raw records 1445-2890 of 2891 "
                                   "(test[50%:])"},
                         {"label": "calibration of int8: wiki.test.raw records 0-1155 of 2891 "
                                   "(train[:40%])"}],
               "overlaps": ["a overlaps b"]}
    text = to_markdown(_dataset_section(dataset))
    assert "| evaluation | wiki.test.raw records 1445-2890 of 2891 (test\\[50%:\\]) |" in text
    row = "| calibration of int8 | wiki.test.raw records 0-1155 of 2891 (train\\[:40%\\]) |"
    assert row in text
    assert "Overlap allowed by the user: a overlaps b." in text


def test_environment_names_the_instruction_set(tmp_path):
    """Results record the CPU's instruction set (quantkit.environment); older ones say so."""
    data = json.loads(ORT.read_text())
    data["environment"]["isa"] = {"arch": "x86_64", "name": "avx2", "flags": ["avx2"],
                                  "u8s8_saturates": True, "source": "/proc/cpuinfo"}
    results = tmp_path / "results-avx2.json"
    results.write_text(json.dumps(data))
    md = build_report([results, TRT], tmp_path / "out").markdown.read_text()
    assert ("| instruction set | avx2 (x86_64; ONNX Runtime's u8 x s8 kernels saturate here) |"
            in md)
    assert "| instruction set | not recorded |" in md  # the TensorRT fixture predates it
