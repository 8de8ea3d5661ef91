"""``quantkit eval`` through the real CLI group: results file, table, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantkit.cli.main import cli
from quantkit.eval.results import load_results
from tests.eval.engines import REPO, built


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.getbasetemp() / "eval-models"  # shared with tests/eval when both run
    root.mkdir(exist_ok=True)
    return {key: built(root, key) for key in ("llama", "llama-twin", "llama-logits")}


BASE = ["--dataset", "sample", "--split", "test", "--max-length", "64", "--limit-tokens", "300",
        "--batch-size", "2", "--latency-grid", "1x16", "--warmup", "0", "--iterations", "2",
        "--threads", "1"]


def invoke(*args: str) -> object:
    return CliRunner().invoke(cli, ["eval", *args], catch_exceptions=False)


def test_eval_writes_results_and_prints_a_table(engines: dict[str, Path], tmp_path: Path
                                                ) -> None:
    out = tmp_path / "results.json"
    result = invoke("--engine", str(engines["llama"]), "--engine", str(engines["llama-twin"]),
                    *BASE, "--out", str(out))
    assert result.exit_code == 0, result.output
    loaded = load_results(out)
    assert loaded.names == ["llama", "llama-twin"]
    assert loaded.dataset["num_tokens"] == 300 and loaded.dataset["max_length"] == 64
    assert loaded.settings["threads"] == 1 and loaded.settings["latency_grid"] == ["1x16"]
    # in-process, the command is spelled out from the parsed options
    command = loaded.commands[0]
    assert command.startswith("quantkit eval --engine ") and f"--out {out}" in command
    assert "--engine" in command.split(str(engines["llama"]))[1] and "--progress" not in command
    ppl = loaded.engines[0].perplexity
    assert f"{ppl:.3f}" in result.output and "p50 ms 1x16" in result.output
    assert "5/5 windows" not in result.output  # no progress bar off a terminal
    # a second run without --force leaves the first results alone
    before = out.read_text()
    again = invoke("--engine", str(engines["llama"]), *BASE, "--out", str(out))
    assert again.exit_code == 2 and "already exists" in again.output
    assert out.read_text() == before
    forced = invoke("--engine", str(engines["llama"]), *BASE, "--out", str(out), "--force")
    assert forced.exit_code == 0 and load_results(out).names == ["llama"]


def test_progress_bar_over_windows(engines: dict[str, Path], tmp_path: Path) -> None:
    result = invoke("--engine", str(engines["llama"]), *BASE, "--progress",
                    "--out", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.output
    assert "llama (fp32)" in result.output and "5/5 windows" in result.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-length", "1024"], "max-length 1024 is beyond the model's limit of 256"),
        (["--stride", "100"], "stride 100 is larger than max-length 64"),
        (["--stride", "0"], "stride must be at least 1"),
        (["--latency-grid", "1by16"], "latency grid entry '1by16' is not BATCHxSEQ"),
    ],
)
def test_bad_settings_exit_2_with_one_line(engines: dict[str, Path], tmp_path: Path,
                                           extra: list[str], message: str) -> None:
    out = tmp_path / "results.json"
    result = invoke("--engine", str(engines["llama"]), *BASE, *extra, "--out", str(out))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]
    assert not out.exists() and not list(tmp_path.iterdir())


def test_mixed_models_empty_text_and_non_engines(engines: dict[str, Path], tmp_path: Path
                                                 ) -> None:
    out = tmp_path / "out" / "results.json"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        (["--engine", str(engines["llama"]), "--engine", str(engines["llama-logits"])],
         "built from different models"),
        (["--engine", str(engines["llama"]), "--dataset", str(empty)], "is empty"),
        (["--engine", str(engines["llama"].parent / "llama-export")], "is not an engine"),
        (["--engine", str(tmp_path / "nowhere")], "does not exist"),
    ]
    for args, message in cases:
        result = invoke(*args, *BASE[2:] if "--dataset" in args else BASE, "--out", str(out))
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.output
        assert not out.exists()


def test_help_imports_no_heavy_library() -> None:
    code = (
        "import sys; from click.testing import CliRunner; from quantkit.cli.main import cli; "
        "r = CliRunner().invoke(cli, ['eval', '--help']); assert r.exit_code == 0, r.output; "
        "assert '--latency-grid' in r.output; "
        "print(sorted(m for m in ('torch', 'onnxruntime', 'tensorrt', 'transformers') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout.strip().replace("'", '"')) == []


def test_table_prints_large_deltas_readably(capsys) -> None:
    """A broken INT8 engine can be 14x worse: the table says +1,410%, not +1.41e+03%."""
    import dataclasses

    from quantkit.cli.eval import _print_table
    from quantkit.eval.results import Delta

    results = load_results(REPO / "tests" / "report" / "data" / "results-ort-cpu.json")
    worse = dataclasses.replace(results.engines[-1], delta_vs_fp32=Delta(abs=300.0, pct=1410.3))
    _print_table(dataclasses.replace(results, engines=[*results.engines[:-1], worse]))
    out = capsys.readouterr().out
    assert "+1,410%" in out and "e+03" not in out
