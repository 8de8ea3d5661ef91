"""A recipe's ``sweep:`` section: axes that turn one recipe file into the cross product of
recipes (models x budgets x objectives, methods x window lengths, ...), for ``quantkit sweep``.

::

    name: demo
    model: smollm2-135m
    quantize: {dataset: sample, max_ppl_increase: 1%}
    sweep:
      model: [smollm2-135m, ./my-model]              # a top-level key ...
      quantize.max_ppl_increase: [1%, 2%]             # ... or a dotted path into a section
      quantize.objective: [coverage, latency]

Each axis is a dotted path into the recipe as written (a number indexes a list: ``engines.1.plan``)
and a non-empty list of values; a path into a section the file does not write creates it
(``calibration.method`` on a recipe with no ``calibration:``). The combinations come in the
order of the axes as written, the first axis varying slowest, and each is named
``<name>-<label of each value>``: a value's label is its text, ``%`` written ``pct``, the last
part of a path or Hub id (``org/model`` -> ``model``), other characters than letters, digits,
``.``, ``_``, ``+`` and ``-`` as ``_``; a value with no such text (a list, a mapping) is labelled
by the path's last key and its position (``engines1``). Every combination is validated as a
recipe of its own (a quantize recipe's section as ``quantkit quantize`` reads it) before any
work: a wrong path, an empty or non-list axis, or a combination the recipe refuses is one error.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.config import Recipe, read_recipe_file
from quantkit.errors import QuantkitError

SWEEP_KEY = "sweep"
# what a sweep names and places itself: each combination's name and folder come from the axes
FIXED = ("name", "version", "workdir", SWEEP_KEY)
EXAMPLE = "e.g. sweep: {quantize.max_ppl_increase: [1%, 2%], calibration.method: [minmax]}"


@dataclass(frozen=True)
class SweepPoint:
    """One recipe of a sweep: where it came from and, for a ``sweep:`` section's combination,
    the value of each axis (empty for a plain recipe)."""

    recipe: Recipe
    source: Path
    axes: dict[str, Any] = field(default_factory=dict)


def load_points(path: Path) -> list[SweepPoint]:
    """The recipe of a file, or every combination of its ``sweep:`` section, validated."""
    path = Path(path)
    data = read_recipe_file(path)
    if not isinstance(data, dict) or SWEEP_KEY not in data:
        recipe = Recipe.from_dict(data, where=str(path))
        check_quantize_section(recipe, str(path))
        return [SweepPoint(recipe, path)]
    base = {k: v for k, v in data.items() if k != SWEEP_KEY}
    axes = read_axes(data[SWEEP_KEY], str(path))
    points = []
    for axis_values, named in expand(base, axes, str(path)):
        where = f"{path}, combination '{named['name']}' (" + ", ".join(
            f"{p}={v!r}" for p, v in axis_values.items()) + ")"
        recipe = _validated(named, where)
        points.append(SweepPoint(recipe, path, axis_values))
    return points


def read_axes(section: Any, where: str) -> dict[str, list[Any]]:
    """The ``sweep:`` section checked: a mapping of axis paths to non-empty lists of values
    whose labels differ."""
    if not isinstance(section, dict) or not section:
        raise QuantkitError(f"{where}: 'sweep' must map axis paths to lists of values",
                            EXAMPLE)
    axes: dict[str, list[Any]] = {}
    for path, values in section.items():
        path = str(path)
        if path in FIXED or path.split(".")[0] in FIXED:
            raise QuantkitError(f"{where}: sweep axis '{path}' cannot be swept",
                                "the sweep names each combination by its axis values and runs "
                                "it in OUT/<that name>")
        if not isinstance(values, list):
            raise QuantkitError(f"{where}: sweep axis '{path}' must be a list of values, got "
                                f"{type(values).__name__} {values!r}",
                                f"write {path}: [{values!r}] for one value")
        if not values:
            raise QuantkitError(f"{where}: sweep axis '{path}' has no values",
                                "give at least one value, or remove the axis")
        labels = [value_label(v, path, i) for i, v in enumerate(values)]
        for i, text in enumerate(labels):
            if text in labels[:i]:
                other = values[labels.index(text)]
                raise QuantkitError(
                    f"{where}: sweep axis '{path}': the values {other!r} and {values[i]!r} "
                    f"give one name '{text}'" if other != values[i] else
                    f"{where}: sweep axis '{path}' lists {values[i]!r} twice",
                    "give each value of an axis once, with its own name")
        axes[path] = values
    return axes


def expand(base: dict[str, Any], axes: dict[str, list[Any]],
           where: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(axis values, recipe data) of every combination: the first axis varies slowest."""
    name = str(base.get("name", "run"))
    for path in axes:
        check_path(path, where)
    out = []
    for combination in itertools.product(*(list(enumerate(v)) for v in axes.values())):
        data = copy.deepcopy(base)
        chosen: dict[str, Any] = {}
        labels = []
        for path, (index, value) in zip(axes, combination, strict=True):
            data = _with_value(data, path, value, where)
            chosen[path] = value
            labels.append(value_label(value, path, index))
        data["name"] = "-".join([name, *labels])
        out.append((chosen, data))
    return out


def value_label(value: Any, path: str, index: int) -> str:
    """A value's part of a combination's name (see the module's docstring)."""
    text = ""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, float, str)):
        text = str(value).rstrip("/").rsplit("/", 1)[-1].replace("%", "pct")
        text = re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_")
    if text in ("", ".", ".."):
        text = f"{path.rsplit('.', 1)[-1]}{index + 1}"
    return text


def check_path(path: str, where: str) -> None:
    """Refuse an axis that names no field of a recipe: the top-level keys, the fields of the
    export, calibration and evaluation sections and of an engine (``engines.N.field``), the keys
    of a quantize section; inside a free mapping (``calibration.params``,
    ``engines.N.options``) any key."""
    import dataclasses

    from quantkit import config
    from quantkit.quantize_config import quantize_section_keys

    keys = path.split(".")
    hint = ("an axis is a dotted path into the recipe as written, e.g. model, "
            "quantize.max_ppl_increase, calibration.method or engines.1.plan")

    def known(names: Sequence[str], depth: int, what: str) -> None:
        if keys[depth] not in names:
            raise QuantkitError(f"{where}: sweep axis '{path}' names no field of the recipe: "
                                f"{what} has no '{keys[depth]}' (it has: "
                                f"{', '.join(sorted(names))})", hint)

    def fields(cls: type) -> dict[str, str]:
        return {f.name: str(f.type) for f in dataclasses.fields(cls)}

    top = fields(config.Recipe)
    known([k for k in top if k not in FIXED], 0, "the recipe")
    sections: dict[str, type] = {"export": config.ExportConfig,
                                 "calibration": config.CalibrationConfig,
                                 "evaluation": config.EvaluationConfig,
                                 "engines": config.EngineConfig}
    if len(keys) == 1:
        return
    if keys[0] == "quantize":
        known(quantize_section_keys(), 1, "a quantize section")
        inner, depth = {}, 1
    elif keys[0] in sections:
        depth = 1
        if keys[0] == "engines":
            if not keys[1].isdigit():
                raise QuantkitError(f"{where}: sweep axis '{path}': engines is a list",
                                    "name an engine by its position, e.g. engines.0.plan")
            depth = 2
            if len(keys) == 2:
                return
        inner = fields(sections[keys[0]])
        known(list(inner), depth, keys[0] if keys[0] != "engines" else "an engine")
    else:
        inner, depth = {}, 0
    if len(keys) > depth + 1 and not inner.get(keys[depth], "").startswith("dict"):
        raise QuantkitError(f"{where}: sweep axis '{path}': "
                            f"{'.'.join(keys[:depth + 1])} is a value, not a section", hint)


def _with_value(data: dict[str, Any], path: str, value: Any, where: str) -> dict[str, Any]:
    """A copy of ``data`` with ``value`` at ``path`` (sections the file does not write are
    made)."""
    out = copy.deepcopy(data)
    keys = path.split(".")
    if any(not k for k in keys):
        raise QuantkitError(f"{where}: sweep axis '{path}' is not a path",
                            "join keys with single dots, e.g. calibration.method")
    node: Any = out
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        here = ".".join(keys[:depth]) or "the recipe"
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise QuantkitError(f"{where}: sweep axis '{path}': {here} is a list of "
                                    f"{len(node)}, '{key}' is not one of its positions",
                                    f"index it with 0..{len(node) - 1}")
            if last:
                node[int(key)] = copy.deepcopy(value)
            else:
                node = node[int(key)]
        elif isinstance(node, dict):
            if last:
                node[key] = copy.deepcopy(value)
            else:
                if node.get(key) is None:
                    if keys[depth + 1].isdigit():
                        raise QuantkitError(f"{where}: sweep axis '{path}': the recipe has no "
                                            f"{'.'.join(keys[:depth + 1])} to index",
                                            "a position names an entry the recipe writes")
                    node[key] = {}
                node = node[key]
        else:
            raise QuantkitError(f"{where}: sweep axis '{path}': {here} holds "
                                f"{type(node).__name__} {node!r}, not a section",
                                "an axis is a dotted path into the recipe's sections")
    return out


def _validated(data: dict[str, Any], where: str) -> Recipe:
    """One combination as a recipe, refused with the combination named."""
    try:
        recipe = Recipe.from_dict(data, where="recipe")
        check_quantize_section(recipe, "recipe")
    except QuantkitError as error:
        raise QuantkitError(f"{where}: {error.message}", error.hint) from None
    return recipe


def check_quantize_section(recipe: Recipe, where: str) -> None:
    """A quantize recipe's section as ``quantkit quantize`` would read it (budget, objective,
    known keys): refused before any recipe of a sweep runs."""
    if recipe.quantize is None:
        return
    from quantkit.quantize_config import QuantizeConfig

    QuantizeConfig.from_recipe(recipe.model, recipe.quantize, recipe.trust_remote_code,
                               where=f"{where}.quantize").check()


def axis_paths(points: Sequence[SweepPoint]) -> list[str]:
    """Every axis of the points, in the order first met: the sweep's columns."""
    paths: list[str] = []
    for point in points:
        paths += [p for p in point.axes if p not in paths]
    return paths
