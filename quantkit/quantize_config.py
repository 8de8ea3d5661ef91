"""The settings of ``quantkit quantize`` (``QuantizeConfig``) and the text parts it reads: one
dataset cut into disjoint calibration, tuning and evaluation parts, or a dataset per role; the
keys a recipe's ``quantize:`` section takes. ``quantkit.oneshot`` runs it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError
from quantkit.generation_check import DEFAULT_NEW_TOKENS, DEFAULT_PROMPTS
from quantkit.ray_tasks import DEFAULT_MAX_RETRIES
from quantkit.text_roles import ROLES

QUANTIZE_NAME = "quantize.json"
QUANTIZE_SCHEMA = "quantkit.quantize/1"
# one local file or folder is cut by record into these parts (percent). Parts taken in blocks
# ('calibration[:40%]/10', each part sampling the whole file) were measured and gave worse plans
# for three seeds (README), so the default parts stay contiguous
LOCAL_PARTS = {"calibration": (0, 40), "tuning": (40, 50), "evaluation": (50, 100)}
# the bundled sample has two files: calibration and tuning share calibration.txt
SAMPLE_SPLITS = {"calibration": "train[:70%]", "tuning": "train[70%:]", "evaluation": "test"}
HUB_SPLITS = {"calibration": "train", "tuning": "validation", "evaluation": "test"}
EXIT_BUDGET_MISSED = 3
MIN_TIME_BUDGET_S = 180


def parse_duration(text: str) -> float:
    """'15m', '900s', '1h', '90' (seconds) -> seconds."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*(s|m|min|h)?\s*", str(text))
    if match is None:
        raise QuantkitError(f"cannot read the time budget '{text}'",
                            "write e.g. 15m, 900s or 1h")
    unit = {"s": 1, None: 1, "m": 60, "min": 60, "h": 3600}[match.group(2)]
    return float(match.group(1)) * unit


@dataclass(frozen=True)
class TextPart:
    """Where one role's text comes from."""

    dataset: str
    split: str
    dataset_config: str | None = None
    text_column: str = "text"


def default_parts(dataset: str, dataset_config: str | None = None, text_column: str = "text",
                  overrides: dict[str, TextPart] | None = None) -> dict[str, TextPart]:
    """Disjoint calibration / tuning / evaluation parts of one dataset: record slices of a local
    file or folder, the sample's files, or a Hub dataset's train / validation / test splits."""
    from quantkit.data import resolve_text_source

    parts: dict[str, TextPart] = {}
    for role in ROLES:
        if dataset == "sample":
            split = SAMPLE_SPLITS[role]
        elif resolve_text_source(dataset, dataset_config).kind == "local":
            lo, hi = LOCAL_PARTS[role]
            split = f"{role}[{f'{lo}%' if lo else ''}:{f'{hi}%' if hi < 100 else ''}]"
        else:
            split = HUB_SPLITS[role]
        parts[role] = TextPart(dataset, split, dataset_config, text_column)
    parts.update(overrides or {})
    return parts


def parts_for(dataset: str, dataset_config: str | None = None, text_column: str = "text",
              calibration_split: str | None = None, tuning_split: str | None = None,
              evaluation_split: str | None = None,
              evaluation_dataset: str | None = None) -> dict[str, TextPart]:
    """``default_parts`` with the overrides the command line and recipes name."""
    overrides = {}
    for role, split in (("calibration", calibration_split), ("tuning", tuning_split)):
        if split:
            overrides[role] = TextPart(dataset, split, dataset_config, text_column)
    if evaluation_dataset or evaluation_split:
        overrides["evaluation"] = TextPart(evaluation_dataset or dataset,
                                           evaluation_split or "test",
                                           None if evaluation_dataset else dataset_config,
                                           text_column)
    return default_parts(dataset, dataset_config, text_column, overrides)


PART_KEYS = ("dataset", "dataset_config", "text_column", "calibration_split", "tuning_split",
             "evaluation_split", "evaluation_dataset")


@dataclass(frozen=True)
class QuantizeConfig:
    """Everything ``quantize`` does; the defaults are the measured best (README)."""

    model: str | None = None  # a model for 'quantkit export' ...
    onnx: Path | None = None  # ... or an existing export
    parts: dict[str, TextPart] = field(default_factory=dict)  # role -> text
    max_ppl_increase: str = "1%"
    objective: str = "coverage"
    max_length: int = 512  # deployment context: tuning windows and evaluation windows
    transform: str = "auto"  # auto | rotate | smoothquant | none
    num_samples: int = 128
    seq_len: int = 256
    gptq: bool = True
    # the search: sensitivity ranks on one window (it only orders the groups; the few that
    # matter stand out by 10x), budget checks on 6 and the held-out check on 12, each at the
    # upper 90 % confidence bound of the increase (AutotuneSettings.confidence)
    rank_windows: int = 1
    search_windows: int = 6
    holdout_windows: int = 12
    method_groups: int = 3
    greedy_runs: int = 10
    max_evals: int = 120
    time_budget: str | None = None  # '15m', '900s', '1h': the search stops to finish in time
    eval_tokens: int | None = 20480  # scored in windows spread over the evaluation part
    seed: int = 0  # calibration blocks, rotation, and (unless tuning_seed) the tuning windows
    tuning_seed: int | None = None  # the windows the search draws; None: seed
    threads: int | None = None
    latency_iterations: int = 10
    trust_remote_code: bool = False
    # the search's measurements as Ray tasks: 'local', 'auto' or a cluster address (None: here);
    # the plan is the same either way, so it is not part of the autotune step's key
    ray: str | None = None
    max_retries: int = DEFAULT_MAX_RETRIES  # Ray's retries of a task whose worker died
    # a KV-cache engine of the verified plan for 'quantkit generate', checked against FP32's
    # greedy tokens (quantkit.cache_quantize); cache_onnx: the cache export with --onnx
    with_cache: bool = False
    cache_onnx: Path | None = None
    generation_prompts: tuple[str, ...] = DEFAULT_PROMPTS
    generation_tokens: int = DEFAULT_NEW_TOKENS

    def check(self) -> None:
        if (self.model is None) == (self.onnx is None):
            raise QuantkitError("give either --model or --onnx",
                                "--model M exports M first; --onnx X uses an existing export")
        if self.transform not in ("auto", "rotate", "smoothquant", "none"):
            raise QuantkitError(f"unknown transform '{self.transform}'",
                                "use auto, rotate, smoothquant or none")
        missing = [r for r in ROLES if r not in self.parts]
        if missing:
            raise QuantkitError(f"no text for {', '.join(missing)}", "pass --dataset")
        for name in ("max_length", "num_samples", "seq_len", "search_windows", "max_evals",
                     "latency_iterations"):
            if int(getattr(self, name)) < 1:
                raise QuantkitError(f"{name.replace('_', '-')} must be at least 1")
        if int(self.max_retries) < 0:
            raise QuantkitError("max-retries must not be negative")
        from quantkit.tune.budget import OBJECTIVES, Budget

        Budget.parse(self.max_ppl_increase)
        if self.time_budget is not None:
            seconds = parse_duration(self.time_budget)
            if seconds < MIN_TIME_BUDGET_S:
                raise QuantkitError(
                    f"--time-budget {self.time_budget} is too small: export, calibration, "
                    f"builds and the evaluation alone take minutes, and the search needs at "
                    f"least one measurement",
                    f"give at least {MIN_TIME_BUDGET_S // 60} minutes, e.g. --time-budget 15m")
        if self.objective not in OBJECTIVES:
            raise QuantkitError(f"unknown objective '{self.objective}'",
                                f"use one of: {', '.join(OBJECTIVES)}")
        from quantkit.cache_quantize import check_cache_settings

        check_cache_settings(self)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("onnx", "cache_onnx"):
            out[key] = None if out[key] is None else str(out[key])
        return out

    @classmethod
    def from_recipe(cls, model: str, section: Any, trust_remote_code: bool = False,
                    where: str = "recipe.quantize") -> QuantizeConfig:
        """A recipe's ``quantize:`` section: ``QuantizeConfig`` fields and the text keys of
        ``parts_for`` (``dataset`` defaults to wikitext, as on the command line)."""
        import dataclasses

        if not isinstance(section, dict):
            raise QuantkitError(f"{where} must be a mapping")
        fields = {f.name for f in dataclasses.fields(cls)} - {"model", "onnx", "parts",
                                                                "trust_remote_code"}
        unknown = sorted(set(section) - set(quantize_section_keys()))
        if unknown:
            raise QuantkitError(f"{where}: unknown key(s) {', '.join(unknown)}",
                                f"known: {', '.join(quantize_section_keys())}")
        texts = {k: section[k] for k in PART_KEYS if k in section}
        texts.setdefault("dataset", "wikitext")
        settings = {k: v for k, v in section.items() if k in fields}
        if "max_ppl_increase" in settings:
            settings["max_ppl_increase"] = str(settings["max_ppl_increase"])
        if "generation_prompts" in settings:
            settings["generation_prompts"] = tuple(settings["generation_prompts"])
        if settings.get("cache_onnx") is not None:
            settings["cache_onnx"] = Path(settings["cache_onnx"])
        try:
            return cls(model=model, parts=parts_for(**texts),
                       trust_remote_code=trust_remote_code, **settings)
        except TypeError as exc:
            raise QuantkitError(f"{where}: {exc}") from None


def quantize_section_keys() -> list[str]:
    """The keys a recipe's ``quantize:`` section takes: ``QuantizeConfig``'s settings and the
    text keys of ``parts_for``."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(QuantizeConfig)} - {
        "model", "onnx", "parts", "trust_remote_code"}
    return sorted(fields | set(PART_KEYS))


