"""Options shared by ``quantkit sensitivity`` and ``quantkit autotune``: the model, its table, the
evaluation text and how it is cut into windows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

_OPTIONS = [
    click.option("--onnx", "onnx_path", required=True, type=click.Path(path_type=Path),
                 help="FP32 export (directory or .onnx) from 'quantkit export' (or a "
                      "calibration's smoothed/ export)."),
    click.option("--table", required=True, type=click.Path(path_type=Path),
                 help="table.json from 'quantkit calibrate' (stats.npz beside it lets autotune "
                      "try other calibration methods per tensor)."),
    click.option("--dataset", default="wikitext", show_default=True,
                 help="Evaluation text: 'sample', a local file or folder, or a Hub dataset."),
    click.option("--dataset-config", default=None),
    click.option("--split", default="validation", show_default=True,
                 help="Keep it apart from the text you report on (local text: e.g. "
                      "'train[40%:50%]')."),
    click.option("--text-column", default="text", show_default=True),
    click.option("--limit-tokens", type=int, default=None,
                 help="Use only the first N tokens of the text."),
    click.option("--max-length", default=256, show_default=True, type=int,
                 help="Window length (tokens)."),
    click.option("--rank-windows", default=2, show_default=True, type=int,
                 help="Windows each group's sensitivity is measured on (one run per group)."),
    click.option("--batch-size", default=2, show_default=True, type=int),
    click.option("--seed", default=0, show_default=True, type=int,
                 help="Seed of the window choice."),
    click.option("--granularity", type=click.Choice(["group", "op"]), default="group",
                 show_default=True,
                 help="group: per transformer block x op kind; op: every MatMul/Gemm alone."),
    click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads."),
    click.option("--weight-layout", default="auto", show_default=True, metavar="auto|s8|u8|s7",
                 help="INT8 weights of the probe and the engines built (as 'quantkit build "
                      "--weight-layout'); auto: this machine's."),
    click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
                 help="Measurement cache (default $QUANTKIT_CACHE/tune)."),
    click.option("--allow-overlap", is_flag=True,
                 help="Tune on text that shares records with the table's calibration text "
                      "(refused otherwise)."),
]


def tune_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_OPTIONS):
        fn = option(fn)
    return fn


def tune_settings(search_windows: int, holdout_windows: int, **kw: Any) -> Any:
    from quantkit.tune.context import TuneSettings

    return TuneSettings(
        onnx=kw["onnx_path"], table=kw["table"], dataset=kw["dataset"],
        dataset_config=kw["dataset_config"], split=kw["split"], text_column=kw["text_column"],
        limit_tokens=kw["limit_tokens"], max_length=kw["max_length"],
        rank_windows=kw["rank_windows"], search_windows=search_windows,
        holdout_windows=holdout_windows,
        batch_size=kw["batch_size"], seed=kw["seed"], granularity=kw["granularity"],
        threads=kw["threads"], cache_dir=kw["cache_dir"], allow_overlap=kw["allow_overlap"],
        weight_layout=str(kw.get("weight_layout") or "auto").lower())


TUNE_KEYS = ("onnx_path", "table", "dataset", "dataset_config", "split", "text_column",
             "limit_tokens", "max_length", "rank_windows", "batch_size", "seed",
             "granularity", "threads", "cache_dir", "allow_overlap", "weight_layout")
