"""quantkit: INT8 quantization and calibration for LLM inference, with measured accuracy and speed.

Importing this package is cheap: torch, onnxruntime and tensorrt are imported only inside the
functions that need them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def quantize(model: str | None = None, *, out: str | Path, dataset: str = "wikitext",
             onnx: str | Path | None = None, force: bool = False, **settings: Any) -> Any:
    """One call from a model to a verified engine within a perplexity budget: the Python form of
    ``quantkit quantize`` with the same defaults. ``settings`` are ``QuantizeConfig`` fields
    (``max_ppl_increase="1%"``, ``max_length=512``, ``time_budget="15m"``, ...) and the text
    overrides of the command line (``tuning_split=...``, ``evaluation_dataset=...``); returns a
    ``QuantizeResult``."""
    from quantkit.oneshot import quantize as run
    from quantkit.quantize_config import PART_KEYS, QuantizeConfig, parts_for

    say = settings.pop("say", print)
    texts = {k: settings.pop(k) for k in PART_KEYS if k in settings}
    parts = settings.pop("parts", None) or parts_for(dataset, **texts)
    config = QuantizeConfig(model=model, onnx=Path(onnx) if onnx else None, parts=parts,
                            **settings)
    return run(config, Path(out), force=force, say=say)
