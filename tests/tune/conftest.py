"""Fixtures for sensitivity / autotune tests: a tiny Llama export with one deliberately fragile
block, calibrated with quantkit's own collector (table.json + stats.npz)."""

from __future__ import annotations

import re

import pytest

from tests.conftest import loaded, make_tiny_llama

FRAGILE_GROUP = "layers.1.mlp_down"
FRAGILE_SCALE = 5000.0


TRAIN_STEPS = 40


def train_briefly(model, tokenizer, steps: int = TRAIN_STEPS):
    """A few AdamW steps on the bundled calibration text: enough to learn token statistics, so
    that quantization error raises perplexity instead of moving it at random (a model with random
    weights predicts almost uniformly and no perturbation makes it consistently worse)."""
    import numpy as np
    import torch

    from tests.conftest import SAMPLE

    ids = np.asarray(tokenizer((SAMPLE / "calibration.txt").read_text())["input_ids"])
    rng = np.random.default_rng(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        starts = rng.integers(0, len(ids) - 65, 16)
        batch = torch.tensor(np.stack([ids[s : s + 64] for s in starts]))
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="session")
def fragile_llama(tiny_tokenizer):
    """Tiny Llama, briefly trained, whose block 1 then gets one MLP channel scaled up by
    FRAGILE_SCALE before the down projection and scaled down by the same factor inside it: the
    same function in FP32, but one outlier channel in the down projection's input, which a
    per-tensor INT8 scale cannot hold together with the others."""
    import torch

    torch.manual_seed(0)
    model = make_tiny_llama(seed=3)
    mlp = model.model.layers[1].mlp
    with torch.no_grad():  # a block-1 MLP that dominates the residual stream, so it matters
        mlp.down_proj.weight *= 8.0
    model = train_briefly(model, tiny_tokenizer)
    with torch.no_grad():
        mlp.up_proj.weight[5, :] *= FRAGILE_SCALE
        mlp.down_proj.weight[:, 5] /= FRAGILE_SCALE
    return loaded(model, tiny_tokenizer, "fragile-llama")


@pytest.fixture(scope="session")
def fragile_export(fragile_llama, tmp_path_factory):
    from quantkit.export import export_model

    return export_model(fragile_llama, tmp_path_factory.mktemp("export") / "fragile",
                        with_nll=True)


@pytest.fixture(scope="session")
def fragile_calibration(fragile_export, tmp_path_factory):
    """``quantkit calibrate`` output for the fragile export: MinMax ranges (the naive method,
    which an outlier channel breaks), quantizable tensors, histograms for the method search."""
    from quantkit.calib.run import CalibrationRequest, run_calibration

    request = CalibrationRequest(onnx=fragile_export.onnx_path.parent, dataset="sample",
                                 split="train", num_samples=16, seq_len=64, batch_size=8,
                                 method="minmax", tensors="quantizable")
    out = tmp_path_factory.mktemp("calib") / "calib"
    run_calibration(request, out)
    return out


@pytest.fixture()
def tune_settings(fragile_export, fragile_calibration, tmp_path):
    from quantkit.tune.context import TuneSettings

    return TuneSettings(onnx=fragile_export.onnx_path.parent,
                        table=fragile_calibration / "table.json", dataset="sample",
                        split="test", max_length=64, search_windows=3, holdout_windows=3,
                        batch_size=3, seed=0, threads=1, cache_dir=tmp_path / "cache")


@pytest.fixture(scope="session")
def fragile_sq_calibration(fragile_export, tmp_path_factory):
    """The same calibration after SmoothQuant with per-group alphas (``--smoothquant auto``):
    the up -> down smoothing moves block 1's outlier channel into the weights."""
    from quantkit.calib.run import CalibrationRequest, run_calibration

    request = CalibrationRequest(onnx=fragile_export.onnx_path.parent, dataset="sample",
                                 split="train", num_samples=16, seq_len=64, batch_size=8,
                                 method="minmax", tensors="quantizable", smoothquant="auto")
    out = tmp_path_factory.mktemp("calib-sq") / "calib-sq"
    run_calibration(request, out)
    return out


def step_totals(lines: list[str]) -> set[int]:
    """The N of every "[k/N] step" line."""
    return {int(m.group(1)) for line in lines if (m := re.match(r"\[\d+/(\d+)\] ", line))}
