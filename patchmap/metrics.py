"""Divergences between next-token distributions, from float32 log-probabilities over the full vocabulary.

patch_metrics computes every per-example metric of many patched runs in few passes over the vocabulary,
piece by piece (at most ROWS runs at a time, so that a piece's temporaries stay in cache), against a table of
target distributions that the runs index into (the runs of one clean batch share its targets; runs of one
target side by side are compared with its row in place, others with a copy of their rows):

- d = log p - log t, then KL(P || T) = sum p d and KL(T || P) = -sum t d (elementwise products summed:
  each term's rounding is relative to itself, so small divergences stay accurate);
- JS(P, T) = (KL(P || M) + KL(T || M)) / 2 with M = (P + T) / 2, its terms as elementwise products too;
  where P and T are the same distribution (d is zero: both KLs are exactly 0) JS is exactly 0.
"""

import math

import torch

from .quantities import TOP_K

# runs per piece, at most: few enough for a piece's [ROWS, vocabulary] temporaries to stay in the last-level
# cache, many enough for each pass over them to be worth starting the threads (with 16 the jobs ran 1% slower)
ROWS = 48
BLOCK = 64  # columns per block of top_k's first pass
SHARED = 4  # runs per target, on average, from which pieces hold one target's runs
TINY = torch.finfo(torch.float32).tiny  # log(max(m, TINY)) is finite where m is 0, and m * it is 0


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor, base: float = 2.0) -> torch.Tensor:
    """KL(P || Q) along the last axis of log-probs [..., V], in units of log `base`: [...]. Terms where P
    is 0 count 0 (log p may be -inf there)."""
    logp, logq = logp.float(), logq.float()
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), 0.0).sum(-1) / math.log(base)


def js_divergence(logp: torch.Tensor, logq: torch.Tensor, base: float = 2.0) -> torch.Tensor:
    """JS(P, Q) along the last axis of log-probs [..., V]: [...], in [0, 1] for base 2; computed as
    patch_metrics does where the log-probs are finite, with zero probabilities allowed elsewhere."""
    logp, logq = logp.float(), logq.float()
    if not (torch.isfinite(logp).all() and torch.isfinite(logq).all()):
        p, q = logp.exp(), logq.exp()
        js = _entropy((p + q) / 2) - (_entropy(p) + _entropy(q)) / 2
        return js.clamp_min(0.0).masked_fill(logp.eq(logq).all(-1), 0.0) / math.log(base)
    shape = logp.shape[:-1]
    logp, logq = logp.reshape(-1, logp.shape[-1]), logq.reshape(-1, logq.shape[-1])
    targets, rows = Targets(logq), torch.arange(len(logq), device=logq.device)
    js = [_divergences(logp[part], targets, rows[part], base)[0] for part in equal_slices(0, len(logp))]
    return (torch.cat(js) if js else logp.new_zeros(0)).reshape(shape)


def _entropy(p):
    """-sum p log p along the last axis, 0 log 0 = 0."""
    return -torch.where(p > 0, p * p.clamp_min(TINY).log(), 0.0).sum(-1)


class Targets:
    """The unpatched target distributions [B, V] that patched runs are compared with (their log-probs and
    probabilities, computed once), and the workspace of the pieces compared with them: four [ROWS, V]
    buffers (at most), allocated once, so that no piece allocates (and page-faults in) large temporaries."""

    def __init__(self, logprobs: torch.Tensor, probs: torch.Tensor = None):
        self.logprobs = logprobs.float()                                      # [B, V]
        self.probs = self.logprobs.exp() if probs is None else probs          # [B, V]
        self._workspace = None

    def top(self, k: int = TOP_K) -> tuple:
        """(token ids [B, k], probabilities [B, k]) of each target's k most probable next tokens."""
        values, tokens = top_k(self.logprobs, k)
        return tokens, values.exp()

    @classmethod
    def from_logits(cls, logits: torch.Tensor) -> "Targets":
        """The targets of logits [B, V], made log-probs as patch_metrics(logits=True) makes a patched run's
        (so that a run equal to its target compares as exactly equal)."""
        logits = logits.float().clone()
        return cls(*_log_softmax_(logits, logits.amax(-1, keepdim=True), torch.empty_like(logits)))

    def workspace(self, rows: int) -> tuple:
        """Four float32 buffers [rows, V] (rows <= ROWS), reused by every piece (made for the largest piece
        so far)."""
        if self._workspace is None or self._workspace.shape[1] < rows:
            self._workspace = torch.empty(4, rows, self.logprobs.shape[-1], device=self.logprobs.device)
        return tuple(self._workspace[:, :rows])


def _divergences(logp, targets, rows, base, p=None, target=None):
    """(JS, KL(P || T), KL(T || P), P) of log-probs `logp` [R, V] against targets.logprobs[rows]; `p`, if
    given, is exp(logp) already, in the workspace's first buffer. With `target` (a row number: every run's
    target is that one), the target row is read in place rather than copied per run."""
    probs, t, d, scratch = targets.workspace(len(logp))
    p = torch.exp(logp, out=probs) if p is None else p
    if target is None:
        rows = rows.to(logp.device)
        torch.index_select(targets.probs, 0, rows, out=t)
        logt = torch.index_select(targets.logprobs, 0, rows, out=d)
    else:
        t, logt = targets.probs[target:target + 1], targets.logprobs[target:target + 1]    # [1, V]
    torch.sub(logp, logt, out=d)                                             # log p - log t
    kl_pt = torch.mul(p, d, out=scratch).sum(-1)
    kl_tp = torch.mul(d, t, out=scratch).sum(-1).neg_()
    logm = torch.add(p, t, out=scratch).mul_(0.5).clamp_min_(TINY).log_()  # log M, M = (P + T) / 2
    kl_pm = torch.sub(logp, logm, out=d).mul_(p).sum(-1)                     # KL(P || M)
    if target is None:
        logt = torch.index_select(targets.logprobs, 0, rows, out=d)
    kl_tm = torch.sub(logt, logm, out=d).mul_(t).sum(-1)                     # KL(T || M)
    js = (0.5 * (kl_pm + kl_tm)).clamp_min_(0.0).masked_fill_((kl_pt == 0) & (kl_tp == 0), 0.0)
    scale = 1.0 / math.log(base)
    return js * scale, kl_pt * scale, kl_tp * scale, p


def patch_metrics(patched: torch.Tensor, targets: Targets, rows: torch.Tensor, target_answer: torch.Tensor,
                  source_answer: torch.Tensor, base: float = 2.0, logits: bool = False) -> dict:
    """Per-run metrics {metric: [R]} of patched runs' log-probs [R, V] against their unpatched targets
    (`targets.logprobs[rows]`, rows [R]); answers [R] token ids. Pieces of at most ROWS runs (pieces());
    with `logits`, `patched` holds float32 logits, turned into log-probs in place piece by piece."""
    parts = [_piece_metrics(patched[part], targets, rows[part], target_answer[part], source_answer[part], base,
                            logits, target) for part, target in pieces(rows)]
    if not parts:
        return _piece_metrics(patched, targets, rows, target_answer, source_answer, base, logits)
    return {k: torch.cat([part[k] for part in parts]) for k in parts[0]}


def pieces(rows: torch.Tensor) -> list:
    """(slice, target) of each piece of runs whose targets are `rows`: where runs of one target lie side by
    side (SHARED of them on average or more), pieces of one target's runs, `target` its row, read in place;
    else pieces of all runs, target None (each run's target row is copied). Either way a stretch of runs is
    cut into as few pieces of at most ROWS as fit, of equal size (100 runs: 34, 33 and 33, not 48, 48 and 4,
    whose small piece costs as many operations for a twelfth of the work)."""
    row_list = rows.tolist()
    starts = [0] + [i for i in range(1, len(row_list)) if row_list[i] != row_list[i - 1]]
    if len(row_list) < SHARED * len(starts):
        return [(part, None) for part in equal_slices(0, len(row_list))]
    ends = starts[1:] + [len(row_list)]
    return [(part, row_list[a]) for a, b in zip(starts, ends) for part in equal_slices(a, b)]


def equal_slices(a: int, b: int, most: int = ROWS) -> list:
    """[a, b) in as few slices of at most `most` as fit, their sizes differing by one at most, the larger
    first (so that a buffer made for the first slice holds the others)."""
    count = -(-(b - a) // most)
    cuts = [a - (-(b - a) * i // count) for i in range(count + 1)] if count else []
    return [slice(c, d) for c, d in zip(cuts, cuts[1:])]


def _piece_metrics(patched, targets, rows, target_answer, source_answer, base, logits=False, target=None):
    patched = patched.float()
    highest, top = top_k(patched, TOP_K)  # [:, :1]: log-softmax's shift
    p = None
    if logits and len(patched):
        patched, p = _log_softmax_(patched, highest[:, :1], targets.workspace(len(patched))[0])
    js, kl_pt, kl_tp, p = _divergences(patched, targets, rows, base, p, target)
    runs = torch.arange(len(patched), device=patched.device)
    return {
        "js": js,
        "kl_patched_target": kl_pt,
        "kl_target_patched": kl_tp,
        "p_target_answer": p[runs, target_answer],
        "p_source_answer": p[runs, source_answer],
        "flip": (top[:, 0] == source_answer).to(torch.int8),
        "top_token": top,
        "top_prob": p.gather(1, top),
    }


def top_k(values: torch.Tensor, k: int) -> tuple:
    """(values, indices) [R, k] of the k largest of each row of `values` [R, V], largest first, as topk
    gives them (among equal values either may come first). Two passes: the maxima of blocks of BLOCK
    columns, then topk over the k blocks with the largest (every one of the k largest lies in them or in
    the columns after the last whole block) instead of over every column, which costs as much as several
    elementwise passes."""
    rows, vocab = values.shape
    k = min(k, vocab)
    blocks = vocab // BLOCK
    if blocks <= 4 * k:
        return values.topk(k, dim=-1)
    whole = values[:, :blocks * BLOCK].view(rows, blocks, BLOCK)
    best = whole.amax(-1).topk(k, dim=-1).indices                                  # [R, k] blocks
    columns = (best[:, :, None] * BLOCK + torch.arange(BLOCK, device=values.device)).view(rows, k * BLOCK)
    rest = torch.arange(blocks * BLOCK, vocab, device=values.device).expand(rows, -1)
    columns = torch.cat([columns, rest], dim=1)                                     # [R, k x BLOCK + rest]
    top, where = values.gather(1, columns).topk(k, dim=-1)
    return top, columns.gather(1, where)


def _log_softmax_(logits, highest, probs):
    """Logits [R, V] (whose row maxima are `highest` [R, 1]) turned into log-probs in place, and their
    probabilities written into `probs`."""
    logits.sub_(highest)
    total = torch.exp(logits, out=probs).sum(-1, keepdim=True)
    probs.div_(total)
    return logits.sub_(total.log_()), probs
