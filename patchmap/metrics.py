"""Divergences between next-token distributions, from float32 log-probabilities over the full vocabulary."""

import math

import torch


def _kl_terms(p, logp, logq):
    """sum p * (log p - log q), with 0 where p is 0 (log p = -inf there); p = exp(logp), passed in so that
    callers computing several divergences exponentiate once."""
    terms = logp - logq
    terms.mul_(p).masked_fill_(p == 0, 0.0)  # in place: these run over [runs, vocabulary] tensors
    return terms.sum(-1)


def _log_mixture(logp, logq):
    # where P and Q agree, M is exactly P: identical distributions then give exactly 0
    logm = torch.logaddexp(logp, logq).sub_(math.log(2.0))
    return torch.where(logp == logq, logp, logm, out=logm)


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor, base: float = 2.0) -> torch.Tensor:
    """KL(P || Q) along the last axis of log-probs [..., V], in units of log `base`: [...]."""
    logp, logq = logp.float(), logq.float()
    return _kl_terms(logp.exp(), logp, logq) / math.log(base)


def js_divergence(logp: torch.Tensor, logq: torch.Tensor, base: float = 2.0) -> torch.Tensor:
    """JS(P, Q) along the last axis of log-probs [..., V]: [...], in [0, 1] for base 2."""
    logp, logq = logp.float(), logq.float()
    return _js(logp.exp(), logq.exp(), logp, logq, base)


def _js(p, q, logp, logq, base):
    logm = _log_mixture(logp, logq)
    js = 0.5 * (_kl_terms(p, logp, logm) + _kl_terms(q, logq, logm)) / math.log(base)
    return js.clamp_min(0.0)  # rounding can leave -1e-9 where P == Q


ROWS = 32  # rows per pass: [rows, vocabulary] temporaries then stay in cache, ~2x faster on a CPU


def patch_metrics(patched: torch.Tensor, target: torch.Tensor, target_answer: torch.Tensor,
                  source_answer: torch.Tensor, base: float = 2.0) -> dict:
    """Per-example metrics {metric: [B]} of patched runs against the unpatched target runs (log-probs
    [B, V] each; answers [B] token ids)."""
    if len(patched) <= ROWS:
        return _patch_metrics(patched, target, target_answer, source_answer, base)
    parts = [_patch_metrics(patched[a:a + ROWS], target[a:a + ROWS], target_answer[a:a + ROWS],
                            source_answer[a:a + ROWS], base) for a in range(0, len(patched), ROWS)]
    return {k: torch.cat([part[k] for part in parts]) for k in parts[0]}


def _patch_metrics(patched, target, target_answer, source_answer, base):
    patched, target = patched.float(), target.float()
    p, t = patched.exp(), target.exp()
    rows = torch.arange(len(patched), device=patched.device)
    return {
        "js": _js(p, t, patched, target, base),
        "kl_patched_target": _kl_terms(p, patched, target) / math.log(base),
        "kl_target_patched": _kl_terms(t, target, patched) / math.log(base),
        "p_target_answer": p[rows, target_answer],
        "p_source_answer": p[rows, source_answer],
        "flip": (patched.argmax(-1) == source_answer).to(torch.int8),
    }
