"""An output that cannot be created (/proc, a path under a regular file) is one clear error
line with exit code 2, given before any work, and nothing is written anywhere.

Tests run as root, for whom permission bits do not stop writes; /proc and "a directory under a
file" refuse everyone."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantkit.artifacts import atomic_output_dir, atomic_write_bytes, check_can_write
from quantkit.errors import QuantkitError
from tests.cli.cli_helpers import invoke, one_line_error
from tests.report.helpers import ORT

pytest_plugins = ("tests.fixtures_build",)

PROC = Path("/proc/quantkit-test-output")


@pytest.fixture()
def under_a_file(tmp_path) -> Path:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    return blocker / "out"


@pytest.fixture(scope="module")
def table_file(tmp_path_factory, llama_table) -> Path:
    path = tmp_path_factory.mktemp("tables") / "llama.json"
    llama_table.save(path)
    return path


def _unwritable_targets(under_a_file: Path) -> list[Path]:
    return [PROC, PROC / "deeper" / "still", under_a_file]


def test_library_refuses_unwritable_outputs(under_a_file, tmp_path):
    for target in _unwritable_targets(under_a_file):
        with pytest.raises(QuantkitError, match=f"cannot write {target}"):
            check_can_write(target, force=False)
        with pytest.raises(QuantkitError, match="cannot write"):
            atomic_write_bytes(target / "x.json", b"{}")
        with pytest.raises(QuantkitError, match="cannot write"), atomic_output_dir(target):
            raise AssertionError("the body must not run")
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]
    check_can_write(tmp_path / "new" / "deeper", force=False)  # creatable: fine, made nothing
    assert not (tmp_path / "new").exists()


def test_build_to_an_unwritable_place(tiny_llama_export, table_file, under_a_file):
    for target in _unwritable_targets(under_a_file):
        line = one_line_error(invoke("build", "--onnx", tiny_llama_export.directory, "--table",
                                     table_file, "--precision", "int8", "--out", target))
        assert line.startswith(f"Error: cannot write {target}: "), line
    assert under_a_file.parent.read_text() == "not a directory\n"


def test_calibrate_to_an_unwritable_place(tiny_llama_export, under_a_file):
    for target in (PROC, under_a_file):
        line = one_line_error(invoke("calibrate", "--onnx", tiny_llama_export.directory,
                                     "--dataset", "sample", "--num-samples", 2, "--seq-len", 16,
                                     "--out", target))
        assert line.startswith(f"Error: cannot write {target}: "), line


def test_report_and_export_to_an_unwritable_place():
    line = one_line_error(invoke("report", ORT, "--out", PROC))
    assert line.startswith(f"Error: cannot write {PROC}: "), line
    # refused before the model is loaded (or fetched)
    line = one_line_error(invoke("export", "--model", "smollm2-135m", "--out", PROC))
    assert line.startswith(f"Error: cannot write {PROC}: "), line


def test_run_with_an_unwritable_workdir(tmp_path, under_a_file):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nname: r\nmodel: smollm2-135m\n"
                      "engines: [{name: fp32, precision: fp32}]\n")
    line = one_line_error(invoke("run", recipe, "--workdir", under_a_file))
    assert line.startswith(f"Error: cannot write {under_a_file}: "), line
