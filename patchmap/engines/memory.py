"""Memory in both engines: the one out-of-memory back-off (a piece of work that runs out of memory is halved
and retried, with a warning in the log), and the C allocator asked to keep freed memory for reuse."""

import ctypes
import ctypes.util
import functools
import logging

import torch

from ..errors import UserError

log = logging.getLogger(__name__)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
KEEP_BELOW = 1 << 28  # allocations up to 256 MB reuse freed heap memory


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc's allocator, once per process, to serve allocations up to KEEP_BELOW from memory freed
    before, and to keep it, rather than map fresh memory for every large temporary and unmap it when freed
    (its default above a few MB): a fresh mapping is page-faulted in as it is first written, about 1 ms per
    4 MB here, and the engines make thousands of temporaries of megabytes (the fast engine's varied block
    calls most: their matrix products ran at two thirds of the reference's rate for it). What the process
    frees stays with it until it ends. True where it took effect; nothing where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BELOW)) and bool(mallopt(M_TRIM_THRESHOLD, 4 * KEEP_BELOW))


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
