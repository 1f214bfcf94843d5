"""Noise samples: each target runs in `samples` noised copies (an intervention's `samples`; ROME averages
10), and the copies' next-token distributions are averaged as probabilities before any metric is computed.
In a batch the copies of example e are rows e x samples + k (k = 0 .. samples - 1), one after another.
With one sample every function here returns its input: the numbers stay those of a single run."""

import math

import torch

from ..metrics import Targets


def copies(items: list, samples: int) -> list:
    """Each item of `items` (one per example) `samples` times in a row: one per batch row."""
    return items if samples == 1 else [item for item in items for _ in range(samples)]


def mean_distribution(logprobs: torch.Tensor, samples: int) -> torch.Tensor:
    """Log-probabilities [R x samples, V], the copies of each run side by side, as the log of each run's
    mean probability over its copies: [R, V]."""
    if samples == 1:
        return logprobs
    return torch.logsumexp(logprobs.view(-1, samples, logprobs.shape[-1]), dim=1) - math.log(samples)


def side_by_side(samples: int, site_of: torch.Tensor, rows: torch.Tensor, layer_ids: torch.Tensor,
                 hidden: torch.Tensor) -> tuple:
    """Patched runs (each a site, a batch row and a layer; hidden [R, H]) reordered so that the copies of
    each (site, example, layer) are side by side, copy 0 first (rows e x samples + k)."""
    if samples == 1:
        return site_of, rows, layer_ids, hidden
    span = int(rows.max()) + 1
    key = (site_of.to(rows.device) * (int(layer_ids.max()) + 1) + layer_ids) * span + rows
    order = torch.argsort(key, stable=True)
    return site_of[order.to(site_of.device)], rows[order], layer_ids[order], hidden[order.to(hidden.device)]


def compared(logits: torch.Tensor, samples: int) -> tuple:
    """(values, logits?): what patch_metrics compares for runs' logits [R x samples, V]: the logits themselves
    with one sample (patch_metrics makes them log-probs, as the targets'), else the log of each run's mean
    distribution over its copies [R, V]."""
    if samples == 1:
        return logits, True
    return mean_distribution(torch.log_softmax(logits.float(), dim=-1), samples), False


def compared_targets(logits: torch.Tensor, samples: int) -> Targets:
    """The unpatched targets of logits [B x samples, V] (with samples, of their copies' mean distribution)."""
    values, is_logits = compared(logits, samples)
    return Targets.from_logits(values) if is_logits else Targets(values)
