"""Divergences between next-token distributions, from float32 log-probabilities over the full vocabulary."""

import math

import torch

METRICS = {
    "js": "Jensen-Shannon divergence between the patched and the unpatched target distribution",
    "kl_patched_target": "KL(P_patched || P_target)",
    "kl_target_patched": "KL(P_target || P_patched)",
    "p_target_answer": "probability of the target's answer token under the patched run",
    "p_source_answer": "probability of the source's answer token under the patched run",
    "flip": "1 if the patched run's top-1 token is the source's answer token, else 0",
}


def _kl_terms(logp, logq):
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def kl_divergence(logp, logq, base=2.0):
    """KL(P || Q) along the last axis, in units of log `base`."""
    return _kl_terms(logp.float(), logq.float()) / math.log(base)


def js_divergence(logp, logq, base=2.0):
    """JS(P, Q) along the last axis; in [0, 1] for base 2."""
    logp, logq = logp.float(), logq.float()
    # where P and Q agree, M is exactly P: identical distributions then give exactly 0
    logm = torch.where(logp == logq, logp, torch.logaddexp(logp, logq) - math.log(2.0))
    js = 0.5 * (_kl_terms(logp, logm) + _kl_terms(logq, logm)) / math.log(base)
    return js.clamp_min(0.0)  # rounding can leave -1e-9 where P == Q


def patch_metrics(patched, target, target_answer, source_answer, base=2.0):
    """Per-example metrics of a patched run against the unpatched target run (log-probs, [B, V])."""
    rows = torch.arange(len(patched), device=patched.device)
    return {
        "js": js_divergence(patched, target, base),
        "kl_patched_target": kl_divergence(patched, target, base),
        "kl_target_patched": kl_divergence(target, patched, base),
        "p_target_answer": patched[rows, target_answer].exp(),
        "p_source_answer": patched[rows, source_answer].exp(),
        "flip": (patched.argmax(-1) == source_answer).to(torch.int8),
    }
