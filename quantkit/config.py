"""Recipes: frozen dataclasses for a whole run (model, data, calibration, engines, evaluation),
validated on load, versioned, and round-tripping through YAML and JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from quantkit.errors import QuantkitError

RECIPE_VERSION = 1
PRECISIONS = ("fp32", "fp16", "int8", "mixed")

T = TypeVar("T")


def _from_mapping(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys with the valid ones listed."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise QuantkitError(f"{where} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise QuantkitError(
            f"unknown key(s) in {where}: {', '.join(unknown)}",
            f"valid keys: {', '.join(sorted(names))}",
        )
    try:
        return cls(**data)
    except TypeError as exc:
        raise QuantkitError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 18
    with_nll: bool = True
    rotate: bool = False  # QuaRot-style rotation of the export (quantkit.rotation); Llama only
    down_block: int = 512  # online Hadamard block before down_proj when rotating (0: none)

    def __post_init__(self) -> None:
        from quantkit.rotation import check_down_block

        try:
            check_down_block(int(self.down_block))
        except QuantkitError as error:
            raise QuantkitError(f"export.down_block: {error.message}") from None


@dataclass(frozen=True)
class CalibrationConfig:
    dataset: str = "wikitext"
    dataset_config: str | None = None
    split: str = "train"
    text_column: str = "text"
    num_samples: int = 512
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0
    method: str = "entropy"
    params: dict[str, Any] = field(default_factory=dict)
    tensors: str = "all"
    smoothquant: float | str | None = None  # SmoothQuant alpha (0..1 or "auto"); None = off
    weights: str = "rtn"  # rtn | gptq (quantkit.calib.gptq)
    gptq_samples: int = 64

    def __post_init__(self) -> None:
        from quantkit.calib.run import check_weights_option
        from quantkit.smoothquant import parse_alpha

        try:
            check_weights_option(self.weights, int(self.gptq_samples))
        except QuantkitError as error:
            raise QuantkitError(f"calibration.weights: {error.message}", error.hint) from None

        try:
            object.__setattr__(self, "smoothquant", parse_alpha(self.smoothquant))
        except QuantkitError as error:
            raise QuantkitError(f"calibration.smoothquant: {error.message}",
                                "give an alpha within 0..1 (e.g. 0.5) or 'auto'") from None
        for name in ("num_samples", "seq_len", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise QuantkitError(f"calibration.{name} must be at least 1")
        if self.tensors not in ("all", "quantizable"):
            raise QuantkitError("calibration.tensors must be 'all' or 'quantizable'")


@dataclass(frozen=True)
class EngineConfig:
    name: str
    precision: str
    backend: str = "onnxruntime"
    plan: str | None = None  # path of a plan recipe (configs/*.yaml)
    options: dict[str, Any] = field(default_factory=dict)
    # optional: a build this backend cannot do here (e.g. FP16 on a CPU without FP16 kernels) is
    # reported and skipped instead of failing the run
    optional: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise QuantkitError(
                f"engine '{self.name}': unknown precision '{self.precision}'",
                f"use one of: {', '.join(PRECISIONS)}",
            )
        if self.precision == "mixed" and not self.plan:
            raise QuantkitError(f"engine '{self.name}': a mixed engine needs a plan")


@dataclass(frozen=True)
class EvaluationConfig:
    dataset: str = "wikitext"
    dataset_config: str | None = None
    split: str = "test"
    text_column: str = "text"
    max_length: int = 512
    stride: int = 512
    limit_tokens: int | None = None
    spread: bool = False  # limit_tokens as windows spread evenly over the text, not its start
    batch_size: int = 1
    latency_grid: list[str] = field(default_factory=lambda: ["1x128", "1x512"])
    warmup: int = 3
    iterations: int = 10
    threads: int | None = None
    allow_overlap: bool = False  # evaluation text may share records with the calibration text

    def __post_init__(self) -> None:
        if self.stride < 1 or self.stride > self.max_length:
            raise QuantkitError(
                f"evaluation.stride must be within 1..max_length ({self.max_length})"
            )
        for shape in self.latency_grid:
            parse_shape(shape)


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes from ``512MB``, ``2GB``, ``1.5GiB`` or a plain number of bytes."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise QuantkitError(f"cannot read the size '{text}'",
                            "give a positive number with a unit, e.g. 512MB, 2GB or 1.5GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_shape(text: str) -> tuple[int, int]:
    """``"4x128"`` -> (batch 4, sequence 128)."""
    try:
        batch, seq = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise QuantkitError(f"bad shape '{text}'", "write BATCHxSEQ, e.g. 1x128") from None
    if batch < 1 or seq < 1:
        raise QuantkitError(f"bad shape '{text}'", "batch and sequence must be at least 1")
    return batch, seq


@dataclass(frozen=True)
class Recipe:
    """A whole run: what ``quantkit run`` executes and ``quantkit demo`` starts from."""

    model: str
    name: str = "run"
    version: int = RECIPE_VERSION
    workdir: str = "out/run"
    trust_remote_code: bool = False
    export: ExportConfig = field(default_factory=ExportConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    engines: list[EngineConfig] = field(default_factory=list)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    # 'quantize' recipes: ``quantkit.quantize_config.QuantizeConfig.from_recipe`` reads this mapping
    # and ``quantkit run`` runs ``quantkit quantize`` instead of the sections above
    quantize: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.version != RECIPE_VERSION:
            raise QuantkitError(
                f"recipe version {self.version} is not supported",
                f"this quantkit reads version {RECIPE_VERSION}",
            )
        names = [e.name for e in self.engines]
        if len(set(names)) != len(names):
            raise QuantkitError(f"engine names must be unique, got {', '.join(names)}")

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise QuantkitError(f"{where} must be a mapping")
        data = dict(data)
        if "sweep" in data:
            raise QuantkitError(
                f"{where} has a 'sweep' section: it stands for several recipes, not one",
                "run it with 'quantkit sweep RECIPE --out DIR'")
        if "model" not in data:
            raise QuantkitError(f"{where} has no 'model'")
        if data.get("quantize") is not None:
            given = sorted({"calibration", "engines", "evaluation", "export"} & set(data))
            if given:
                raise QuantkitError(
                    f"{where} has a 'quantize' section and {', '.join(given)}: quantize "
                    "chooses its own calibration, engines and evaluation",
                    "remove those sections, or the 'quantize' section for a run of your own")
            if not isinstance(data["quantize"], dict):
                raise QuantkitError(f"{where}.quantize must be a mapping")
        export = _from_mapping(ExportConfig, data.pop("export", None), f"{where}.export")
        calibration = _from_mapping(
            CalibrationConfig, data.pop("calibration", None), f"{where}.calibration"
        )
        evaluation = _from_mapping(
            EvaluationConfig, data.pop("evaluation", None), f"{where}.evaluation"
        )
        engines_data = data.pop("engines", None) or []
        if not isinstance(engines_data, list):
            raise QuantkitError(f"{where}.engines must be a list")
        engines = [
            _from_mapping(EngineConfig, e, f"{where}.engines[{i}]")
            for i, e in enumerate(engines_data)
        ]
        base = _from_mapping(Recipe, {**data, "model": data["model"]}, where)
        return dataclasses.replace(
            base, engines=engines, export=export, calibration=calibration, evaluation=evaluation
        )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.quantize is None:
            del data["quantize"]
        else:  # quantize chooses these itself
            for key in ("export", "calibration", "engines", "evaluation"):
                del data[key]
        return data

    @classmethod
    def load(cls, path: Path) -> Recipe:
        return cls.from_dict(read_recipe_file(path), where=str(path))

    def to_yaml(self) -> str:
        import yaml

        return str(yaml.safe_dump(self.to_dict(), sort_keys=False))


def read_recipe_file(path: Path) -> Any:
    """A recipe file's YAML as written (``Recipe.load`` and ``quantkit sweep``'s ``sweep:``
    sections read it the same way)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise QuantkitError(f"recipe {path} not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise QuantkitError(f"{path} is not valid YAML: {exc}") from None
