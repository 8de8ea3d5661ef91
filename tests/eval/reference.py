"""PyTorch references for perplexity, written independently of quantkit.eval.perplexity."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def hf_guide_perplexity(model: Any, ids: np.ndarray, max_length: int, stride: int) -> float:
    """The loop of Hugging Face's perplexity guide (labels masked with -100, the model's own
    shifted loss, weighted by ``num_valid_tokens - batch_size``)."""
    import torch

    encodings = torch.from_numpy(np.asarray(ids, dtype=np.int64))[None, :]
    seq_len = encodings.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            outputs = model(input_ids, labels=target_ids)
            neg_log_likelihood = outputs.loss
        num_valid_tokens = (target_ids != -100).sum().item()
        num_loss_tokens = num_valid_tokens - target_ids.size(0)
        nll_sum += float(neg_log_likelihood) * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens)


def exact_torch_perplexity(model: Any, ids: np.ndarray, max_length: int, stride: int
                           ) -> tuple[float, int]:
    """Each token new to a window scored once (summed NLL / count), in float64 from torch logits."""
    import torch

    tokens = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    total, count, prev_end = 0.0, 0, 0
    n = tokens.numel()
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        first = max(prev_end, begin + 1)
        if first < end:
            with torch.no_grad():
                logits = model(tokens[None, begin:end]).logits[0].double()
            logprobs = torch.log_softmax(logits[first - begin - 1 : end - begin - 1], dim=-1)
            picked = logprobs.gather(-1, tokens[first:end, None])
            total += float(-picked.sum())
            count += end - first
        prev_end = end
        if end == n:
            break
    return math.exp(total / count), count
