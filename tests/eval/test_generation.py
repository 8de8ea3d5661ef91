"""``quantkit eval`` on KV-cache engines: perplexity through the cache, generation latency
(TTFT, time per output token), greedy-token agreement, grids and their refusals."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from quantkit.errors import QuantkitError
from quantkit.eval.evaluate import EvalConfig, evaluate_engines
from quantkit.eval.generation import (
    DecodePoint,
    GenerationConfig,
    agreement_prompts,
    parse_decode_grid,
    parse_prompt_lengths,
    resolve_grid,
)
from quantkit.eval.latency import GridPoint
from quantkit.eval.results import load_results, write_results
from tests.build_helpers import make_table, token_feeds

GEN = GenerationConfig(prompt_lengths=(16, 40), decode_grid=(DecodePoint(1, 20),
                                                             DecodePoint(3, 50)),
                       iterations=3, agreement_prompts=3, agreement_prompt_tokens=12,
                       agreement_new_tokens=10)
CONFIG = EvalConfig(dataset="sample", split="test", max_length=48, stride=48, limit_tokens=200,
                    batch_size=2, latency_grid=(GridPoint(1, 16),), warmup=1, iterations=2,
                    threads=1, generation=GEN)


@pytest.fixture(scope="module")
def cache_engines(tiny_llama_export, tiny_llama_cache_export, tmp_path_factory):
    """FP32 engines of the plain and the cache export, and an INT8 cache engine (a MinMax table of
    the plain export carried to the cache graph)."""
    from quantkit.build import build_engine

    root = tmp_path_factory.mktemp("gen-engines")
    plain = build_engine(root / "plain-fp32", precision="fp32", onnx=tiny_llama_export.directory)
    fp32 = build_engine(root / "cache-fp32", precision="fp32",
                        onnx=tiny_llama_cache_export.directory)
    table = make_table(tiny_llama_export.onnx_path, token_feeds(2, seq=24))
    int8 = build_engine(root / "cache-int8", precision="int8",
                        onnx=tiny_llama_cache_export.directory, table=table,
                        table_onnx=tiny_llama_export.onnx_path)
    return plain.path, fp32.path, int8.path, _noisy_copy(fp32.path, root / "cache-noisy")


def _noisy_copy(engine: Path, out: Path) -> Path:
    """A deliberately different engine: the FP32 cache engine with a fixed random vector (std
    100, far beyond the logits' scale) added to its logits, so its greedy tokens follow the
    vector, not the text (same manifest, so the same model as far as eval knows)."""
    import shutil

    import onnx
    from onnx import helper, numpy_helper

    shutil.copytree(engine, out)
    model = onnx.load(str(out / "engine.onnx"))
    graph = model.graph
    for node in graph.node:
        node.output[:] = ["logits_raw" if o == "logits" else o for o in node.output]
    vocab = graph.output[0].type.tensor_type.shape.dim[2].dim_value or 512
    bias = np.random.default_rng(1).normal(0, 100, vocab).astype(np.float32)
    graph.initializer.append(numpy_helper.from_array(bias, "logits_bias"))
    graph.node.append(helper.make_node("Add", ["logits_raw", "logits_bias"], ["logits"]))
    onnx.save(model, str(out / "engine.onnx"))
    return out


@pytest.fixture(scope="module")
def cache_results(cache_engines):
    _, fp32, int8, noisy = cache_engines
    return evaluate_engines([fp32, int8, noisy], CONFIG, command="quantkit eval ...")


# -- grids -------------------------------------------------------------------------------------
def test_parse_grids():
    assert parse_prompt_lengths("128, 512,128") == [128, 512]
    assert parse_prompt_lengths("none") == [] and parse_prompt_lengths("default") is None
    assert parse_decode_grid("1x128,8X512") == [DecodePoint(1, 128), DecodePoint(8, 512)]
    assert parse_decode_grid("none") == [] and parse_decode_grid("") is None
    for bad in ("0", "12a", "-5"):
        with pytest.raises(QuantkitError, match="not a positive integer"):
            parse_prompt_lengths(bad)
    with pytest.raises(QuantkitError, match="not BATCHxPAST"):
        parse_decode_grid("1x")
    with pytest.raises(QuantkitError, match="at least 1"):
        parse_decode_grid("0x128")


def test_default_grid_keeps_what_fits_the_model():
    grid = resolve_grid(GenerationConfig(), max_positions=600)
    assert grid.prompt_lengths == (128, 512)
    assert [str(p) for p in grid.decode] == ["1x128", "1x512", "8x128", "8x512"]
    assert grid.dropped == ("prompt 2048", "decode 1x2048", "decode 8x2048")
    everything = resolve_grid(GenerationConfig(), max_positions=8192)
    assert len(everything.decode) == 6 and everything.dropped == ()


def test_explicit_points_beyond_the_model_are_refused():
    assert resolve_grid(GenerationConfig(decode_grid=(DecodePoint(1, 255),)), 256).decode == (
        DecodePoint(1, 255),)
    with pytest.raises(QuantkitError, match="decode grid 2x256.*256 positions"):
        resolve_grid(GenerationConfig(decode_grid=(DecodePoint(2, 256),)), 256)
    with pytest.raises(QuantkitError, match="prompt length 300 is beyond"):
        resolve_grid(GenerationConfig(prompt_lengths=(128, 300)), 256)


def test_cli_refuses_a_past_beyond_the_positions(cache_engines, tmp_path):
    from quantkit.cli.main import cli

    out = tmp_path / "r.json"
    args = ["eval", "--engine", str(cache_engines[1]), "--dataset", "sample", "--limit-tokens",
            "200", "--max-length", "48", "--out", str(out)]
    result = CliRunner().invoke(cli, [*args, "--decode-grid", "1x256"])
    assert result.exit_code == 2, result.output
    assert "decode grid 1x256" in result.output and "limit of 256 positions" in result.output
    result = CliRunner().invoke(cli, [*args, "--ttft-lengths", "300"])
    assert result.exit_code == 2 and "prompt length 300 is beyond" in result.output
    result = CliRunner().invoke(cli, [*args, "--decode-grid", "1x12,x4"])
    assert result.exit_code == 2 and "not BATCHxPAST" in result.output
    result = CliRunner().invoke(cli, [*args, "--agreement-new-tokens", "250"])
    assert result.exit_code == 2 and "exceed the model's 256 positions" in result.output
    assert not out.exists()


# -- agreement ---------------------------------------------------------------------------------
def test_agreement_prompts_are_evenly_spaced():
    ids = np.arange(100)
    prompts, offsets = agreement_prompts(ids, 3, 10)
    assert offsets == [0, 45, 90] and prompts.shape == (3, 10)
    assert (prompts[2] == np.arange(90, 100)).all()
    with pytest.raises(QuantkitError, match="fewer than one agreement prompt"):
        agreement_prompts(ids[:5], 2, 10)


# -- end to end --------------------------------------------------------------------------------
def test_cache_engine_perplexity_equals_the_full_sequence_engine(cache_engines, cache_results):
    """Scored through the cache token by token, the cache graph gives the plain graph's
    perplexity (same windows, same tokens); overlapping windows too (a prefill of more than
    one token)."""
    plain = evaluate_engines([cache_engines[0]], dataclasses.replace(CONFIG, latency_grid=()))
    fp32 = cache_results.engines[0]
    assert fp32.eval_output == "decode" and fp32.num_scored_tokens == 200 - 5
    assert fp32.perplexity == pytest.approx(plain.engines[0].perplexity, rel=1e-5)
    overlap = dataclasses.replace(CONFIG, stride=20, latency_grid=(),
                                  generation=dataclasses.replace(GEN, prompt_lengths=(),
                                                                 decode_grid=(),
                                                                 agreement_prompts=0))
    a = evaluate_engines([cache_engines[0]], overlap).engines[0]
    b = evaluate_engines([cache_engines[1]], overlap).engines[0]
    assert a.num_scored_tokens == b.num_scored_tokens == 199
    assert b.perplexity == pytest.approx(a.perplexity, rel=1e-5)
    assert b.generation is not None and b.generation.agreement is None


def test_generation_structure_and_agreement(cache_results):
    fp32, int8, noisy = cache_results.engines
    assert fp32.latency == () and int8.latency == ()  # the full-pass grid is not theirs
    for eng in (fp32, int8, noisy):
        gen = eng.generation
        assert [(p.kind, p.batch, p.tokens, p.past, p.iterations) for p in gen.ttft] == [
            ("prefill", 1, 16, 0, 3), ("prefill", 1, 40, 0, 3)]
        assert [(p.kind, p.batch, p.tokens, p.past, p.iterations) for p in gen.decode] == [
            ("decode", 1, 1, 20, 3), ("decode", 3, 1, 50, 3)]
        for p in (*gen.ttft, *gen.decode):
            assert 0 < p.min_ms <= p.p50_ms <= p.p90_ms <= p.max_ms
            assert p.tokens_per_s == pytest.approx(p.batch * p.tokens / (p.mean_ms / 1e3))
        assert len(gen.tokens) == 3 and all(len(row) == 10 for row in gen.tokens)
    assert fp32.generation.agreement.token_match == 1.0
    assert fp32.generation.agreement.mean_common_prefix == 10.0
    assert int8.generation.agreement.reference == "cache-fp32"
    assert 0.0 <= int8.generation.agreement.token_match <= 1.0
    assert noisy.generation.agreement.token_match < 1.0
    assert noisy.generation.agreement.mean_common_prefix < 10.0
    assert fp32.generation.agreement.teacher_forced == 1.0
    assert 0.0 <= int8.generation.agreement.teacher_forced <= 1.0
    assert noisy.generation.agreement.teacher_forced < 1.0
    for eng in (fp32, int8, noisy):
        agreed = eng.generation.agreement
        assert (agreed.prompts, agreed.new_tokens, agreed.positions) == (3, 10, 30)
    settings = cache_results.settings["generation"]
    assert settings["prompt_lengths"] == [16, 40] and settings["decode_grid"] == ["1x20", "3x50"]
    assert settings["agreement_offsets"] == [0, 94, 188] and settings["interleaved"] is True


def test_agreement_tokens_are_generate_s(cache_engines, cache_results):
    """The agreement's tokens are what ``quantkit generate`` (greedy) gives for the same prompt."""
    from quantkit.backends.base import Engine
    from quantkit.data import resolve_text_source
    from quantkit.eval.engines import load_engines
    from quantkit.eval.perplexity import tokenize_text
    from quantkit.eval.text import load_evaluation_text
    from quantkit.generate import greedy_decode

    info = load_engines([cache_engines[1]])[0]
    text = load_evaluation_text(resolve_text_source("sample", split="test"))
    tokens = tokenize_text(info.tokenizer, text.text, 200).ids
    with Engine.load(cache_engines[1]).runner(threads=1) as runner:
        rows, _ = greedy_decode(runner, info.cache_layout, [list(tokens[94:106])], 10,
                                pad_id=0, eos_ids=())
    assert tuple(rows[0]) == cache_results.engines[0].generation.tokens[1]


def test_teacher_forced_is_each_prompt_read_alone(cache_engines, cache_results):
    """The teacher-forced count: the engine's top-1 on the reference's tokens after each
    agreement prompt, at batch 1 (``forced_top1``), compared with those tokens."""
    from quantkit.agreement import forced_top1
    from quantkit.backends.base import Engine
    from quantkit.data import resolve_text_source
    from quantkit.eval.evaluate import load_engines
    from quantkit.eval.perplexity import tokenize_text
    from quantkit.eval.text import load_evaluation_text

    info = load_engines([cache_engines[3]])[0]
    text = load_evaluation_text(resolve_text_source("sample", split="test"))
    tokens = tokenize_text(info.tokenizer, text.text, 200).ids
    reference = cache_results.engines[0].generation.tokens
    with Engine.load(cache_engines[3]).runner(threads=1) as runner:
        forced = [forced_top1(runner, info.cache_layout, list(tokens[s:s + 12]), row)
                  for s, row in zip([0, 94, 188], reference, strict=True)]
    equal = sum(a == b for f, r in zip(forced, reference, strict=True)
                for a, b in zip(f, r, strict=True))
    assert cache_results.engines[2].generation.agreement.teacher_forced_equal == equal


def test_results_round_trip(cache_results, tmp_path):
    path = write_results(cache_results, tmp_path / "results.json")
    again = load_results(path)
    assert again == cache_results
    data = json.loads(path.read_text())
    assert data["engines"][2]["generation"]["agreement"]["token_match"] < 1.0
    assert data["engines"][2]["generation"]["agreement"]["teacher_forced"] < 1.0
    assert data["engines"][0]["generation"]["agreement"]["teacher_forced"] == 1.0
    data["engines"][1]["generation"]["decode"][0]["kind"] = "prefill"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(QuantkitError, match=r"engines\[1\].generation.decode\[0\].kind"):
        load_results(bad)


def _older_results(cache_results, path: Path) -> Path:
    """``cache_results`` as quantkit wrote them before the agreement's counts and
    teacher-forced share."""
    data = json.loads(write_results(cache_results, path).read_text())
    for engine in data["engines"]:
        for key in ("positions", "equal", "identical", "first_differences",
                    "teacher_forced_equal", "teacher_forced"):
            del engine["generation"]["agreement"][key]
    path.write_text(json.dumps(data))
    return path


def test_results_without_teacher_forced_still_load(cache_results, tmp_path):
    old = load_results(_older_results(cache_results, tmp_path / "old.json"))
    for before, after in zip(cache_results.engines, old.engines, strict=True):
        a, b = before.generation.agreement, after.generation.agreement
        assert b.teacher_forced is None and b.teacher_forced_equal is None
        assert b.first_differences is None
        assert (b.positions, b.equal, b.identical) == (a.positions, a.equal, a.identical)
        assert (b.token_match, b.mean_common_prefix, b.identical_share) == (
            a.token_match, a.mean_common_prefix, a.identical_share)


def test_agreement_shares_are_checked(cache_results, tmp_path):
    path = write_results(cache_results, tmp_path / "results.json")
    data = json.loads(path.read_text())
    agreed = data["engines"][1]["generation"]["agreement"]
    off = abs(agreed["teacher_forced_equal"] - 0.5) / agreed["positions"]  # no count gives it
    for key, value, message in (("teacher_forced", 1.5, "a share must be between 0 and 1"),
                                ("teacher_forced", off, "[0-9.e-]+ does not match the counts"),
                                ("token_match", -0.1, "a share must be between 0 and 1")):
        bad = json.loads(json.dumps(data))
        bad["engines"][1]["generation"]["agreement"][key] = value
        path.write_text(json.dumps(bad))
        with pytest.raises(QuantkitError, match=rf"engines\[1\].generation.agreement.{key}: "
                                                f"{message}"):
            load_results(path)


def test_cache_and_plain_engines_do_not_mix(cache_engines):
    with pytest.raises(QuantkitError, match="cache-fp32 is a KV-cache engine and plain-fp32"):
        evaluate_engines([cache_engines[0], cache_engines[1]], CONFIG)


def test_cli_prints_the_generation_table(cache_engines, tmp_path):
    from quantkit.cli.main import cli

    out = tmp_path / "r.json"
    result = CliRunner().invoke(cli, [
        "eval", "--engine", str(cache_engines[1]), "--engine", str(cache_engines[2]),
        "--dataset", "sample", "--limit-tokens", "120", "--max-length", "48", "--threads", "1",
        "--ttft-lengths", "16", "--decode-grid", "1x20", "--generation-iterations", "2",
        "--agreement-prompts", "2", "--agreement-prompt-tokens", "8",
        "--agreement-new-tokens", "6", "--warmup", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "TTFT ms 16" in result.output and "ms/token 1x20" in result.output
    assert "100.0%" in result.output  # the FP32 engine against itself
    assert "teacher-forced" in result.output
    agreed = load_results(out).engines[1].generation.agreement
    assert agreed.prompts == 2 and 0.0 <= agreed.teacher_forced <= 1.0
    assert f"{100 * agreed.teacher_forced:.1f}%" in result.output


def test_report_shows_the_generation_plot_and_table(cache_results, tmp_path):
    from quantkit.report.build import build_report
    from quantkit.report.generation import GENERATION_PNG

    results = write_results(cache_results, tmp_path / "results.json")
    report = build_report([results], tmp_path / "report")
    md = report.markdown.read_text()
    assert "## Generation (KV-cache engines)" in md and f"]({GENERATION_PNG})" in md
    assert (report.directory / GENERATION_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "TTFT ms (16 tokens)" in md and "ms/token 3×50" in md and "tokens/s 1×20" in md
    section = md[md.index("## Generation"):].splitlines()
    fp32_row = next(line for line in section if line.startswith("| cache-fp32 "))
    assert "| tokens = FP32 | teacher-forced | common prefix |" in md
    assert fp32_row.count("100.0%") == 3 and "10.0 / 10" in fp32_row
    noisy = cache_results.engines[2].generation.agreement
    noisy_row = next(line for line in section if line.startswith("| cache-noisy "))
    assert f"{100 * noisy.token_match:.1f}% | {100 * noisy.teacher_forced:.1f}%" in noisy_row
    html = report.html.read_text()
    assert "Generation (KV-cache engines)" in html and "data:image/png;base64" in html
    data = json.loads(report.json.read_text())
    assert data["engines"][0]["generation"]["decode"][1]["past"] == 50


def test_report_of_older_results_has_no_teacher_forced(cache_results, tmp_path):
    from quantkit.report.build import build_report

    report = build_report([_older_results(cache_results, tmp_path / "results.json")],
                          tmp_path / "report")
    md = report.markdown.read_text()
    section = md[md.index("## Generation"):].splitlines()
    fp32_row = next(line for line in section if line.startswith("| cache-fp32 "))
    assert "| 100.0% | — | 10.0 / 10 | 100.0% |" in fp32_row
