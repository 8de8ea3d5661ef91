"""``quantkit sensitivity`` and ``quantkit autotune`` through click."""

from __future__ import annotations

from click.testing import CliRunner

from quantkit.cli.main import cli
from tests.tune.conftest import FRAGILE_GROUP

pytest_plugins = ("tests.tune.conftest",)


def _common(export, calibration, cache) -> list[str]:
    return ["--onnx", str(export.onnx_path.parent), "--table", str(calibration / "table.json"),
            "--dataset", "sample", "--split", "test", "--max-length", "64",
            "--threads", "1", "--cache-dir", str(cache)]


def test_sensitivity_command(fragile_export, fragile_calibration, tmp_path) -> None:
    args = ["sensitivity", *_common(fragile_export, fragile_calibration, tmp_path / "c"),
            "--out", str(tmp_path / "s")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("group "))
    assert lines[header + 1].startswith(FRAGILE_GROUP)  # the ranking's first row
    assert (tmp_path / "s" / "sensitivity.json").is_file()
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 2 and "already exists" in again.output


def test_autotune_command(fragile_export, fragile_calibration, tmp_path) -> None:
    out = tmp_path / "a"
    args = ["autotune", *_common(fragile_export, fragile_calibration, tmp_path / "c"),
            "--search-windows", "3", "--holdout-windows", "3", "--max-ppl-increase", "1%",
            "--methods", "minmax", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "Held-out:" in result.output and "met" in result.output
    assert "Verified" in result.output and "within the budget" in result.output
    plan = out / "plan.yaml"
    assert plan.is_file() and (out / "engine" / "manifest.json").is_file()
    build = CliRunner().invoke(cli, [
        "build", "--onnx", str(fragile_export.onnx_path.parent), "--precision", "mixed",
        "--plan", str(plan), "--table", str(out / "table.json"), "--out", str(tmp_path / "b")])
    assert build.exit_code == 0, build.output


def test_autotune_bad_input_is_one_line(fragile_export, fragile_calibration, tmp_path) -> None:
    base = ["autotune", *_common(fragile_export, fragile_calibration, tmp_path / "c"),
            "--out", str(tmp_path / "x")]
    for extra, message in [(["--max-ppl-increase", "lots"], "perplexity budget"),
                           (["--methods", "entropy,kl"], "unknown calibration method"),
                           (["--search-windows", "100000"], "window")]:
        result = CliRunner().invoke(cli, [*base, *extra])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
        assert not (tmp_path / "x").exists()
    missing = CliRunner().invoke(cli, ["autotune", "--onnx", str(tmp_path / "nope"), "--table",
                                       str(tmp_path / "t.json"), "--out", str(tmp_path / "y")])
    assert missing.exit_code == 2 and "Error:" in missing.output


def test_autotune_candidate_option(fragile_export, fragile_calibration, fragile_sq_calibration,
                                   tmp_path) -> None:
    """--candidate adds another calibration (its ONNX from its manifest); a table that is not a
    calibration's is one clear error, before anything is written."""
    out = tmp_path / "a"
    base = ["autotune", *_common(fragile_export, fragile_calibration, tmp_path / "c"),
            "--search-windows", "3", "--holdout-windows", "3", "--methods", "minmax",
            "--max-evals", "30", "--no-build"]
    result = CliRunner().invoke(cli, [*base, "--candidate",
                                      str(fragile_sq_calibration / "table.json"),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "* candidate SmoothQuant alpha auto" in result.output
    assert f"Build engines of this plan from {fragile_sq_calibration / 'smoothed'}" in \
        result.output
    stray = tmp_path / "stray" / "table.json"
    stray.parent.mkdir()
    stray.write_text((fragile_calibration / "table.json").read_text())
    bad = CliRunner().invoke(cli, [*base, "--candidate", str(stray), "--out",
                                   str(tmp_path / "x")])
    assert bad.exit_code == 2, bad.output
    assert "not a quantkit artifact directory" in bad.output
    assert not (tmp_path / "x").exists()
