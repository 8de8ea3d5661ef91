"""``quantkit generate``: greedy tokens of FP32 cache engines equal Hugging Face's
``generate(do_sample=False)``; timing is reported; bad input is one clear error (CLI exit 2)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from quantkit.cli.main import cli
from quantkit.errors import QuantkitError
from quantkit.generate import generate, left_pad

PROMPTS = ["The", "In the beginning of the history of the", "A cat sat on the mat and"]


@pytest.fixture(scope="module")
def llama_engine(tiny_llama_cache_export, tmp_path_factory):
    from quantkit.build import build_engine

    return build_engine(tmp_path_factory.mktemp("engine") / "llama", precision="fp32",
                        onnx=tiny_llama_cache_export.directory)


@pytest.fixture(scope="module")
def gpt2_engine(tiny_gpt2_cache_export, tmp_path_factory):
    from quantkit.build import build_engine

    return build_engine(tmp_path_factory.mktemp("engine") / "gpt2", precision="fp32",
                        onnx=tiny_gpt2_cache_export.directory)


def hf_greedy(model, tokenizer, prompts, max_new_tokens):
    """Hugging Face's greedy tokens for ``prompts`` as one left-padded batch, cut after EOS."""
    import torch

    ids = [tokenizer(p)["input_ids"] for p in prompts]
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else tokenizer.pad_token_id
    pad = pad if pad is not None else (eos if eos is not None else 0)
    input_ids, mask = left_pad(ids, pad)
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(input_ids),
                             attention_mask=torch.from_numpy(mask), do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=None, pad_token_id=pad)
    rows = []
    for row in out[:, input_ids.shape[1]:].tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        rows.append(row)
    return rows


@pytest.mark.parametrize("engine_fixture,model_fixture", [("llama_engine", "tiny_llama"),
                                                          ("gpt2_engine", "tiny_gpt2")])
def test_greedy_tokens_equal_hugging_face(request, engine_fixture, model_fixture):
    engine = request.getfixturevalue(engine_fixture)
    loaded = request.getfixturevalue(model_fixture)
    result = generate(engine, PROMPTS, max_new_tokens=16, threads=1)
    assert result.tokens == hf_greedy(loaded.model, loaded.tokenizer, PROMPTS, 16)
    for prompt in PROMPTS:  # one prompt alone: no padding
        alone = generate(engine.path, prompt, max_new_tokens=16, threads=1)
        assert alone.tokens == hf_greedy(loaded.model, loaded.tokenizer, [prompt], 16)
    assert len(result.texts) == len(PROMPTS)


def test_timing_and_streaming(llama_engine):
    pieces: list[str] = []
    result = generate(llama_engine, PROMPTS[1], max_new_tokens=8, threads=1,
                      on_text=pieces.append)
    timing = result.timing
    assert timing.batch == 1 and timing.new_tokens == 8
    assert len(timing.decode_steps_s) == 7
    assert timing.ttft_s > 0 and timing.per_token_p50_s is not None
    assert timing.tokens_per_s == pytest.approx(8 / timing.total_s)
    assert "".join(pieces) == result.texts[0]
    record = timing.to_dict()
    assert {"ttft_s", "per_token_p50_s", "tokens_per_s"} <= set(record)


def test_end_of_text_finishes_a_row(llama_engine):
    """With the first greedy token made the EOS token, each row stops there, as in HF."""
    from quantkit.backends.base import Engine
    from quantkit.export_cache import CacheLayout
    from quantkit.generate import greedy_decode

    engine = Engine.load(llama_engine.path)
    layout = CacheLayout.from_dict(engine.manifest["cache"])
    with engine.runner(threads=1) as runner:
        free, _ = greedy_decode(runner, layout, [[5, 6, 7], [8]], 6, pad_id=0)
        eos = free[1][2]  # row 1's third token
        tokens, timing = greedy_decode(runner, layout, [[5, 6, 7], [8]], 6, pad_id=0,
                                       eos_ids=[eos])
    assert tokens[1] == free[1][: free[1].index(eos) + 1]
    assert timing.new_tokens == sum(len(t) for t in tokens)


@pytest.mark.parametrize("prompts,max_new,match", [
    (["ok"], 0, "at least 1"),
    (["ok"], -3, "at least 1"),
    ([""], 4, "empty prompt"),
    (["   "], 4, "empty prompt"),
    ([], 4, "no prompt"),
    (["word " * 300], 4, "longer than the model's 256 positions"),
    (["word " * 120], 200, "exceeds the model's 256 positions"),
])
def test_bad_requests(llama_engine, prompts, max_new, match):
    with pytest.raises(QuantkitError, match=match):
        generate(llama_engine, prompts, max_new_tokens=max_new)


def test_plain_engine_is_refused(tiny_llama_export, tmp_path):
    from quantkit.build import build_engine

    engine = build_engine(tmp_path / "plain", precision="fp32", onnx=tiny_llama_export.directory)
    with pytest.raises(QuantkitError, match="no KV-cache inputs.*--with-cache"):
        generate(engine, "Hello", max_new_tokens=4)


def test_cli_streams_one_prompt_and_reports_timing(llama_engine):
    result = CliRunner().invoke(cli, ["generate", "--engine", str(llama_engine.path),
                                      "--prompt", "The cat", "--max-new-tokens", "5",
                                      "--threads", "1"])
    assert result.exit_code == 0, result.output
    expected = generate(llama_engine, "The cat", max_new_tokens=5, threads=1).texts[0]
    assert result.output.startswith("The cat" + expected)
    assert "time to first token" in result.output and "tokens/s" in result.output


def test_cli_batch_prints_each_prompt(gpt2_engine):
    result = CliRunner().invoke(cli, ["generate", "--engine", str(gpt2_engine.path),
                                      "--prompt", "The", "--prompt", "A cat sat on",
                                      "--max-new-tokens", "3", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "[0] The" in result.output and "[1] A cat sat on" in result.output
    assert "batch 2" in result.output


@pytest.mark.parametrize("args,match", [
    (["--max-new-tokens", "0"], "at least 1"),
    (["--max-new-tokens", "-1"], "at least 1"),
    (["--prompt", ""], "empty prompt"),
])
def test_cli_bad_input_exits_2(llama_engine, args, match):
    base = ["generate", "--engine", str(llama_engine.path)]
    if "--prompt" not in args:
        base += ["--prompt", "Hi"]
    result = CliRunner().invoke(cli, base + args)
    assert result.exit_code == 2
    assert match in result.output


def test_cli_plain_engine_exits_2(tiny_gpt2_export, tmp_path):
    from quantkit.build import build_engine

    engine = build_engine(tmp_path / "plain", precision="fp32", onnx=tiny_gpt2_export.directory)
    result = CliRunner().invoke(cli, ["generate", "--engine", str(engine.path), "--prompt", "Hi"])
    assert result.exit_code == 2
    assert "--with-cache" in result.output


@pytest.mark.slow
def test_smollm2_greedy_tokens_equal_hugging_face(smollm2, tmp_path_factory):
    """SmolLM2-135M: the FP32 cache engine's 32 greedy tokens for 3 prompts (one padded batch)
    are Hugging Face's. Exports the cache graph (about 2-3 minutes on 2 cores)."""
    from quantkit.build import build_engine
    from quantkit.export import export_model

    root = tmp_path_factory.mktemp("smollm2-cache")
    export = export_model(smollm2, root / "export", with_cache=True)
    assert export.manifest["check"]["relative_error"] < 1e-4
    assert export.manifest["cache"]["num_layers"] == 30
    engine = build_engine(root / "engine", precision="fp32", onnx=export.directory)
    prompts = ["The capital of France is", "Once upon a time, in a small village by the sea,",
               "def fibonacci(n):"]
    result = generate(engine, prompts, max_new_tokens=32)
    assert result.tokens == hf_greedy(smollm2.model, smollm2.tokenizer, prompts, 32)
    assert result.timing.per_token_p50_s is not None
