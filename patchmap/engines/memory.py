"""The one out-of-memory back-off of both engines: a piece of work that runs out of memory is halved and
retried, with a warning in the log."""

import logging

import torch

from ..errors import UserError

log = logging.getLogger(__name__)


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA and CPU allocation failures (torch.OutOfMemoryError or the allocators' messages)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in message
                                                or "DefaultCPUAllocator: can't allocate" in message)


def halve_range(item: tuple):
    """(a, b) as its two halves, or None for a single example."""
    a, b = item
    if b - a == 1:
        return None
    mid = (a + b) // 2
    return [(a, mid), (mid, b)]


def halving_on_out_of_memory(pending, work, split, describe, on_retry=None):
    """Yield (item, work(item)) for each item of `pending`, in order. An item whose work runs out of memory
    (CUDA or CPU) is replaced by split(item), its halves, which run next (on_retry(item) first, e.g. to
    lower a budget); an item that cannot be split (split returns None) ends in a patchmap error.
    `describe(item)` names the work in the log, e.g. "patching examples 0-7 at site Subj."."""
    pending = list(pending)
    while pending:
        item = pending.pop(0)
        try:
            result = work(item)
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_out_of_memory(error):
                raise
            halves = split(item)
            if not halves:
                raise UserError(f"out of memory {describe(item)}, which cannot be split further; use a smaller "
                                "model or dtype, or another device") from None
            if on_retry is not None:
                on_retry(item)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.warning("out of memory %s (%s); retrying in halves", describe(item), str(error).splitlines()[0][:200])
            pending[:0] = halves
            continue
        yield item, result
