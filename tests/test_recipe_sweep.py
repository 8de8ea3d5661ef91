"""A recipe's ``sweep:`` section: expansion order and names, values set at dotted paths, and every
kind of bad section refused before any work (exit 2, nothing written)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from quantkit.cli.main import cli
from quantkit.config import Recipe
from quantkit.errors import QuantkitError
from quantkit.recipe_sweep import load_points, value_label

RUN = {
    "version": 1, "name": "base", "model": "/models/tiny-llama",
    "calibration": {"dataset": "sample", "num_samples": 4, "seq_len": 32},
    "engines": [{"name": "fp32", "precision": "fp32"},
                {"name": "mixed", "precision": "mixed", "plan": "configs/int8.yaml"}],
    "evaluation": {"dataset": "sample", "split": "test", "max_length": 64, "stride": 64},
}
QUANTIZE = {"version": 1, "name": "q", "model": "smollm2-135m",
            "quantize": {"dataset": "sample", "max_ppl_increase": "1%"}}


def _write(tmp_path: Path, data: dict[str, Any], sweep: Any) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**data, "sweep": sweep}, sort_keys=False))
    return path


def test_combinations_come_in_axis_order_named_by_their_values(tmp_path) -> None:
    path = _write(tmp_path, QUANTIZE, {
        "model": ["smollm2-135m", "HuggingFaceTB/SmolLM2-360M"],
        "quantize.max_ppl_increase": ["1%", "2%"],
        "quantize.objective": ["coverage", "latency"]})
    points = load_points(path)
    assert [p.recipe.name for p in points] == [
        "q-smollm2-135m-1pct-coverage", "q-smollm2-135m-1pct-latency",
        "q-smollm2-135m-2pct-coverage", "q-smollm2-135m-2pct-latency",
        "q-SmolLM2-360M-1pct-coverage", "q-SmolLM2-360M-1pct-latency",
        "q-SmolLM2-360M-2pct-coverage", "q-SmolLM2-360M-2pct-latency"]
    last = points[-1]
    assert last.axes == {"model": "HuggingFaceTB/SmolLM2-360M",
                         "quantize.max_ppl_increase": "2%", "quantize.objective": "latency"}
    assert last.recipe.model == "HuggingFaceTB/SmolLM2-360M"
    assert last.recipe.quantize == {"dataset": "sample", "max_ppl_increase": "2%",
                                    "objective": "latency"}
    assert all(p.source == path for p in points)
    # the base is not changed by its combinations
    assert points[0].recipe.quantize == {"dataset": "sample", "max_ppl_increase": "1%",
                                         "objective": "coverage"}


def test_a_combination_is_the_recipe_written_by_hand(tmp_path) -> None:
    """Each combination equals the recipe with its values written in, name included."""
    base = {k: v for k, v in RUN.items() if k != "calibration"}  # a section made by the axis
    path = _write(tmp_path, base, {"calibration.method": ["minmax", "percentile"],
                                   "engines.1.plan": ["configs/int8.yaml",
                                                      "configs/mixed-safe.yaml"],
                                   "evaluation.max_length": [64, 128]})
    points = load_points(path)
    assert len(points) == 8
    point = points[3]  # minmax, mixed-safe, 128
    assert point.recipe.name == "base-minmax-mixed-safe.yaml-128"
    by_hand = {**base, "name": point.recipe.name, "calibration": {"method": "minmax"},
               "engines": [base["engines"][0], {**base["engines"][1],
                                                "plan": "configs/mixed-safe.yaml"}],
               "evaluation": {**base["evaluation"], "max_length": 128}}
    assert point.recipe == Recipe.from_dict(by_hand)


def test_value_labels() -> None:
    assert value_label("1%", "quantize.max_ppl_increase", 0) == "1pct"
    assert value_label("/data/models/tiny-llama/", "model", 0) == "tiny-llama"
    assert value_label("a b:c", "x", 0) == "a_b_c"
    assert value_label(0.5, "calibration.smoothquant", 0) == "0.5"
    assert value_label(True, "export.rotate", 0) == "true"
    assert value_label([{"name": "fp32", "precision": "fp32"}], "engines", 1) == "engines2"
    assert value_label(None, "calibration.smoothquant", 2) == "smoothquant3"


def test_a_whole_section_or_list_can_be_an_axis(tmp_path) -> None:
    fp32 = [{"name": "fp32", "precision": "fp32"}]
    path = _write(tmp_path, RUN, {"engines": [fp32, [*fp32, {"name": "int8",
                                                             "precision": "int8"}]]})
    points = load_points(path)
    assert [p.recipe.name for p in points] == ["base-engines1", "base-engines2"]
    assert [len(p.recipe.engines) for p in points] == [1, 2]


@pytest.mark.parametrize(("base", "sweep", "message"), [
    (QUANTIZE, {"max_ppl_increase": ["1%"]},
     r"sweep axis 'max_ppl_increase' names no field of the recipe: the recipe has no "
     r"'max_ppl_increase'"),
    (QUANTIZE, {"quantize.max_ppl": ["1%"]},
     r"axis 'quantize.max_ppl' names no field.*quantize section has no 'max_ppl'"),
    (RUN, {"calibration.methd": ["minmax"]},
     r"axis 'calibration.methd' names no field.*calibration has no 'methd'"),
    (RUN, {"engines.0.precison": ["int8"]}, r"an engine has no 'precison'"),
    (RUN, {"engines.5.plan": ["x.yaml"]}, r"engines is a list of 2, '5' is not one"),
    (RUN, {"engines.plan": ["x.yaml"]}, r"engines is a list"),
    (RUN, {"model.name": ["x"]}, r"model is a value, not a section"),
    (QUANTIZE, {"quantize.objective": []}, r"axis 'quantize.objective' has no values"),
    (QUANTIZE, {"quantize.objective": "latency"},
     r"axis 'quantize.objective' must be a list of values, got str"),
    (QUANTIZE, {"quantize.objective": ["latency", "latency"]}, r"lists 'latency' twice"),
    (RUN, {"model": ["/a/tiny", "/b/tiny"]}, r"'/a/tiny' and '/b/tiny' give one name 'tiny'"),
    (RUN, {"name": ["a", "b"]}, r"axis 'name' cannot be swept"),
    (RUN, {"workdir": ["a"]}, r"axis 'workdir' cannot be swept"),
    (RUN, [], r"'sweep' must map axis paths to lists of values"),
    (RUN, {}, r"'sweep' must map axis paths to lists of values"),
    (QUANTIZE, {"quantize.objective": ["coverage", "speed"]},
     r"combination 'q-speed' \(quantize.objective='speed'\): unknown objective 'speed'"),
    (QUANTIZE, {"quantize.max_ppl_increase": ["1%", "lots"]},
     r"combination 'q-lots' \(quantize.max_ppl_increase='lots'\)"),
    (RUN, {"evaluation.stride": [64, 128]},
     r"combination 'base-128' \(evaluation.stride=128\): evaluation.stride must be within"),
    (QUANTIZE, {"calibration.method": ["minmax"]},
     r"combination 'q-minmax'.*'quantize' section and calibration"),
])
def test_bad_sweep_sections_are_one_error(tmp_path, base, sweep, message) -> None:
    with pytest.raises(QuantkitError, match=message):
        load_points(_write(tmp_path, base, sweep))


def test_bad_sweep_is_exit_2_before_any_work(tmp_path) -> None:
    path = _write(tmp_path, QUANTIZE, {"quantize.objective": ["coverage", "speed"]})
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["sweep", str(path), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "unknown objective 'speed'" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_a_sweep_file_is_not_one_recipe(tmp_path) -> None:
    path = _write(tmp_path, QUANTIZE, {"quantize.objective": ["coverage"]})
    with pytest.raises(QuantkitError, match="has a 'sweep' section.*quantkit sweep"):
        Recipe.load(path)
    result = CliRunner().invoke(cli, ["run", str(path)])
    assert result.exit_code == 2
    assert "quantkit sweep" in result.output


def test_combinations_and_plain_recipes_share_one_namespace(tmp_path) -> None:
    from quantkit.sweep import load_sweep

    sweep = _write(tmp_path, RUN, {"calibration.method": ["minmax", "percentile"]})
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({**RUN, "name": "base-minmax"}))
    assert [p.recipe.name for p in load_sweep([plain])] == ["base-minmax"]
    with pytest.raises(QuantkitError, match="same name 'base-minmax'"):
        load_sweep([sweep, plain])
