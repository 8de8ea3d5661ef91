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
    (``max_ppl_increase="1%"``, ``max_length=512``, ...); returns a ``QuantizeResult``."""
    from quantkit.oneshot import QuantizeConfig, default_parts
    from quantkit.oneshot import quantize as run

    say = settings.pop("say", print)
    parts = settings.pop("parts", None) or default_parts(dataset)
    config = QuantizeConfig(model=model, onnx=Path(onnx) if onnx else None, parts=parts,
                            **settings)
    return run(config, Path(out), force=force, say=say)
