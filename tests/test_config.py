"""Recipes validate on load and round-trip through YAML and JSON."""

from __future__ import annotations

import json

import pytest

from quantkit.config import Recipe, parse_shape
from quantkit.errors import QuantkitError

RECIPE = {
    "model": "smollm2-135m",
    "name": "t",
    "calibration": {"dataset": "sample", "num_samples": 8, "seq_len": 64, "method": "minmax"},
    "engines": [
        {"name": "fp32", "precision": "fp32"},
        {"name": "mixed", "precision": "mixed", "plan": "configs/mixed-safe.yaml"},
    ],
    "evaluation": {"dataset": "sample", "split": "test", "max_length": 128, "stride": 64,
                   "latency_grid": ["1x64", "2x128"]},
}


def test_round_trip_yaml_and_json(tmp_path):
    recipe = Recipe.from_dict(RECIPE)
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    assert Recipe.load(path) == recipe
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    assert recipe.calibration.batch_size == 8  # default kept
    assert recipe.engines[1].plan == "configs/mixed-safe.yaml"


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"calibration": {"num_sample": 3}}, "unknown key.*num_sample.*valid keys"),
        ({"engines": [{"name": "x", "precision": "int4"}]}, "unknown precision 'int4'"),
        ({"engines": [{"name": "x", "precision": "mixed"}]}, "needs a plan"),
        ({"engines": [{"name": "a", "precision": "fp32"}] * 2}, "must be unique"),
        ({"evaluation": {"max_length": 128, "stride": 256}}, "stride must be within"),
        ({"evaluation": {"latency_grid": ["1by128"]}}, "bad shape"),
        ({"version": 2}, "version 2 is not supported"),
        ({"calibration": {"tensors": "some"}}, "'all' or 'quantizable'"),
    ],
)
def test_invalid_recipes(patch, message):
    with pytest.raises(QuantkitError, match=message):
        Recipe.from_dict({**RECIPE, **patch})


def test_missing_model_and_file(tmp_path):
    with pytest.raises(QuantkitError, match="no 'model'"):
        Recipe.from_dict({"name": "x"})
    with pytest.raises(QuantkitError, match="not found"):
        Recipe.load(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(QuantkitError, match="not valid YAML"):
        Recipe.load(bad)


def test_parse_shape():
    assert parse_shape("4x128") == (4, 128)
    with pytest.raises(QuantkitError):
        parse_shape("0x128")


def test_optional_engines_and_smoothquant_alpha():
    recipe = Recipe.from_dict({**RECIPE, "engines": [
        {"name": "fp16", "precision": "fp16", "optional": True}],
        "calibration": {"smoothquant": 0.5}})
    assert recipe.engines[0].optional
    assert recipe.calibration.smoothquant == 0.5
    with pytest.raises(QuantkitError, match="alpha"):
        Recipe.from_dict({**RECIPE, "calibration": {"smoothquant": 2}})


def test_calibration_weights_option_is_checked():
    recipe = Recipe.from_dict({**RECIPE, "calibration": {"weights": "gptq", "gptq_samples": 16}})
    assert (recipe.calibration.weights, recipe.calibration.gptq_samples) == ("gptq", 16)
    with pytest.raises(QuantkitError, match="calibration.weights: unknown weight rounding"):
        Recipe.from_dict({**RECIPE, "calibration": {"weights": "awq"}})
    with pytest.raises(QuantkitError, match="gptq-samples must be at least 1"):
        Recipe.from_dict({**RECIPE, "calibration": {"weights": "gptq", "gptq_samples": 0}})
