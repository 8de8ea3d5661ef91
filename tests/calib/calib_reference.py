"""Plain reference implementations the vectorised production code is checked against.

Written from NVIDIA's description (GTC 2017 S7310) and pytorch-quantization's semantics: one loop
over the candidate thresholds with vector operations inside, levels from ``np.digitize`` on a
``linspace`` as pytorch-quantization does, KL with scipy.stats.entropy's conventions.
"""

from __future__ import annotations

import numpy as np


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """scipy.stats.entropy(p, q): both normalised; 0 log 0 = 0; p > 0 with q = 0 -> inf."""
    p = p / p.sum()
    q = q / q.sum()
    if np.any((p > 0) & (q == 0)):
        return float("inf")
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def entropy_divergences_loop(counts, start_bin=128, num_levels=128, stride=1):
    bins = np.asarray(counts, dtype=np.float64).copy()
    bins[0] = bins[1]
    cands, divs = [], []
    for i in range(start_bin, len(bins) + 1, stride):
        levels = np.digitize(np.arange(i), np.linspace(0, i, num=num_levels + 1)) - 1
        levels[bins[:i] == 0] = -1
        valid = levels >= 0
        level_mass = np.bincount(levels[valid], weights=bins[:i][valid], minlength=num_levels)
        level_bins = np.bincount(levels[valid], minlength=num_levels)
        q = np.zeros(i)
        q[valid] = level_mass[levels[valid]] / level_bins[levels[valid]]
        p = bins[:i].copy()
        p[-1] += bins[i:].sum()
        if q.sum() == 0:
            divs.append(float("nan"))  # 0/0, as scipy would give
        else:
            divs.append(kl_divergence(p, q))
        cands.append(i)
    return np.array(cands), np.array(divs)


def entropy_threshold_bin_loop(counts, start_bin=128, num_levels=128, stride=1):
    """pytorch-quantization's choice: the last index of the minimum divergence."""
    cands, divs = entropy_divergences_loop(counts, start_bin, num_levels, stride)
    last_argmin = len(divs) - 1 - int(np.argmin(divs[::-1]))
    return int(cands[last_argmin])


def mse_amax_loop(counts, edges, start_bin=128, stride=1, num_bits=8):
    """pytorch-quantization's _compute_amax_mse, one candidate at a time (float64)."""
    counts = np.asarray(counts, dtype=np.float64)
    centers = (edges[1:] + edges[:-1]) / 2
    top = 2 ** (num_bits - 1) - 1
    errors, args = [], []
    for i in range(start_bin, len(centers), stride):
        amax = centers[i]
        scale = top / amax
        q = np.clip(np.round(centers * scale), -top, top) / scale
        errors.append(np.mean((q - centers) ** 2 * counts))
        args.append(i)
    return float(centers[args[int(np.argmin(errors))]])
