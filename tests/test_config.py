"""Recipes validate on load and round-trip through YAML and JSON."""

from __future__ import annotations

import json

import pytest

from quantkit.config import Recipe, parse_shape, parse_size
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


def test_every_shipped_recipe_loads() -> None:
    from pathlib import Path

    from quantkit.quantize_config import QuantizeConfig
    from quantkit.recipe_sweep import load_points

    configs = Path(__file__).resolve().parents[1] / "configs"
    recipes = [p for p in sorted(configs.glob("*.yaml")) if "model:" in p.read_text()]
    assert {p.name for p in recipes} >= {"demo.yaml", "compare-precisions.yaml"}
    for path in recipes:
        for point in load_points(path):  # a sweep file: every combination
            recipe = point.recipe
            if recipe.quantize is not None:
                config = QuantizeConfig.from_recipe(recipe.model, recipe.quantize)
                config.check()
        if "sweep:" not in path.read_text():
            assert Recipe.load(path) == recipe
    demo = Recipe.load(configs / "demo.yaml")
    config = QuantizeConfig.from_recipe(demo.model, demo.quantize)
    assert config.parts["calibration"].split == "train[:50%]"
    assert config.parts["tuning"].split == "train[50%:]"
    assert config.parts["evaluation"].split == "test"
    assert config.max_length == 256 and config.max_ppl_increase == "1%"
    # the demo swept over budgets and objectives: the demo's settings, four named combinations
    swept = load_points(configs / "demo-sweep.yaml")
    assert [p.recipe.name for p in swept] == [
        "demo-sweep-1pct-coverage", "demo-sweep-1pct-latency", "demo-sweep-2pct-coverage",
        "demo-sweep-2pct-latency"]
    assert {k: v for k, v in swept[3].recipe.quantize.items()
            if k not in ("max_ppl_increase", "objective")} == \
        {k: v for k, v in demo.quantize.items() if k != "max_ppl_increase"}
    assert (swept[3].recipe.quantize["max_ppl_increase"], swept[3].recipe.quantize["objective"]) \
        == ("2%", "latency")


def test_quantize_recipe_round_trips_and_refuses_other_sections(tmp_path) -> None:
    section = {"dataset": "sample", "max_ppl_increase": "2%", "max_length": 128}
    recipe = Recipe.from_dict({"model": "m", "quantize": section})
    path = tmp_path / "q.yaml"
    path.write_text(recipe.to_yaml())
    assert Recipe.load(path) == recipe
    with pytest.raises(QuantkitError, match="'quantize' section and engines"):
        Recipe.from_dict({"model": "m", "quantize": section,
                          "engines": [{"name": "fp32", "precision": "fp32"}]})


def test_quantize_section_names_its_unknown_keys() -> None:
    from quantkit.quantize_config import QuantizeConfig

    with pytest.raises(QuantkitError, match="unknown key.*max_ppl.*known:"):
        QuantizeConfig.from_recipe("m", {"max_ppl": "1%"})


def test_parse_size():
    assert parse_size("512MB") == 512 * 10**6
    assert parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("2 gb") == 2 * 10**9
    assert parse_size(4096) == 4096
    for bad in ("lots", "-1GB", "0", "3 parsecs"):
        with pytest.raises(QuantkitError, match="cannot read the size"):
            parse_size(bad)
