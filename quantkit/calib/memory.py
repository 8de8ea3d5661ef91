"""Will a calibration fit in this machine's memory? An estimate from the model's weight bytes and
the settings, checked before any work, so that a step too big for the machine stops with one
clear message and the flag that makes it fit, instead of the kernel's OOM killer an hour in.

The ratios are measured (TinyLlama-1.1B's shape, 4.40 GB of FP32 weights, 64 x 512 tokens, on
the 2-core development machine; README "A 1.1B model on this machine"):

* statistics with every segment loaded at once: 12.75 GB peak, 2.9x the weights;
* statistics layer by layer: about two segments' weights (the one running and the one being
  freed) plus the values the sequences carry between segments (five hidden-state-sized tensors
  per sequence: 20 MB per 512-token sequence at hidden size 2048) plus 1 GB of runtime;
* GPTQ in passes (models under 2 GiB): its last pass holds the weights the pass needs (all of
  them for the last layers), the Hessians of one group (``--gptq-memory``) and about 0.15x the
  weights besides (7.10 GB = 4.40 + 2.18 + 0.52 at that shape, forced into passes);
* GPTQ layer by layer (past 2 GiB): what the statistics hold plus one segment's Hessians (about
  its weights' size: 531 MB for three layers of that shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError

ALL_AT_ONCE_RATIO = 3.0
GPTQ_EXTRA_RATIO = 0.15
CARRIED_HIDDEN_STATES = 5
RUNTIME_BYTES = 1 << 30
GB = 1e9


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes each part of a calibration is expected to need."""

    statistics: int
    gptq: int | None  # None without GPTQ

    @property
    def peak(self) -> int:
        return max(self.statistics, self.gptq or 0)


def estimate_calibration(model: Any, *, layer_segment_bytes: int | None, num_samples: int,
                         seq_len: int, gptq_memory: int | None, gptq: bool) -> MemoryEstimate:
    """The estimate for ``model`` (a ModelProto, external data not loaded)."""
    from quantkit.calib.gptq import hessian_budget
    from quantkit.onnx_io import weight_bytes

    weights = weight_bytes(model)
    if layer_segment_bytes is None:
        statistics = int(ALL_AT_ONCE_RATIO * weights)
    else:
        carried = CARRIED_HIDDEN_STATES * _hidden_size(model) * 4 * seq_len * num_samples
        statistics = 2 * layer_segment_bytes + carried + RUNTIME_BYTES
    gptq_bytes = None
    if gptq and layer_segment_bytes is not None:  # GPTQ layer by layer: + a segment's Hessians
        gptq_bytes = statistics + layer_segment_bytes
    elif gptq:
        budget = gptq_memory if gptq_memory is not None else hessian_budget(weights)
        gptq_bytes = int(weights * (1 + GPTQ_EXTRA_RATIO)) + budget
    return MemoryEstimate(statistics, gptq_bytes)


def _hidden_size(model: Any) -> int:
    """The width of the first MatMul/Gemm weight's input: the model's hidden size."""
    from quantkit.calib.gptq import input_width, weight_targets

    inits = {t.name: t for t in model.graph.initializer}
    targets = weight_targets(model)
    return input_width(targets[0], inits[targets[0].source]) if targets else 0


def check_fits(estimate: MemoryEstimate, available: int | None, *, gptq_memory: int | None,
               weights: int) -> None:
    """Refuse, before any work, a calibration whose estimate passes the available memory."""
    if available is None or estimate.peak <= available:
        return
    have = f"this machine has {available / GB:.1f} GB available"
    if estimate.gptq is not None and estimate.gptq >= estimate.statistics:
        floor = int(weights * (1 + GPTQ_EXTRA_RATIO)) + (256 << 20)
        hint = ("--weights rtn skips GPTQ (round-to-nearest weights)" if floor > available
                else f"--gptq-memory {max(256, int((available - floor) / 2**20) // 2)}MB holds "
                     "fewer Hessians at once (more passes over the GPTQ samples)")
        raise QuantkitError(
            f"GPTQ needs about {estimate.gptq / GB:.1f} GB (the model's weights in ONNX Runtime "
            f"plus {'--gptq-memory' if gptq_memory else 'the default'} Hessian memory); {have}",
            hint)
    raise QuantkitError(
        f"calibration statistics need about {estimate.statistics / GB:.1f} GB; {have}",
        "calibrate on fewer samples (--num-samples) or shorter blocks (--seq-len), or on a "
        "machine with more memory")


def check_calibration_fits(onnx_path: Path, *, layer_segment_bytes: int | None,
                           num_samples: int, seq_len: int, gptq_memory: int | None, gptq: bool,
                           available: int | None = None) -> MemoryEstimate:
    """Estimate the calibration of ``onnx_path`` and refuse it when it cannot fit
    (``available`` defaults to this machine's MemAvailable)."""
    import onnx

    from quantkit.environment import available_memory_bytes
    from quantkit.onnx_io import weight_bytes

    model = onnx.load(str(onnx_path), load_external_data=False)
    estimate = estimate_calibration(model, layer_segment_bytes=layer_segment_bytes,
                                    num_samples=num_samples, seq_len=seq_len,
                                    gptq_memory=gptq_memory, gptq=gptq)
    check_fits(estimate, available_memory_bytes() if available is None else available,
               gptq_memory=gptq_memory,
               weights=weight_bytes(model))
    return estimate
