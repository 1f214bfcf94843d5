"""The fast engine's schedule: which runs share a block call. A run is one (example, layer) of a site on
one clean batch; runs are grouped by how many positions they compute (not by where they start), chunked
to a token budget, and halved when a chunk runs out of memory. RowIndex describes the rows of one block
call: each row's example, first computed position and prefix."""

from collections import defaultdict
from dataclasses import dataclass

import torch

PADDING = 0.25  # the share of padded positions up to which runs of different widths share block calls


class RowIndex:
    """Rows of a block call: row r is a run on clean example examples[r] at positions
    [starts[r], starts[r] + widths[r]), padded at the end to `width` (`real`, the widths on the CPU, None:
    every row is `width` wide); its prefix (positions before starts[r]) is read from a cache padded to
    `prefix` positions (at least the longest start, given by the caller so that no device sync is needed),
    and masked beyond starts[r]. A padded position computes garbage that no real one reads: its key is
    masked, and it stands at its row's last real position wherever a position is looked up."""

    def __init__(self, examples, starts, width, prefix, real=None, widths=None):
        self.examples, self.starts, self.width, self.prefix = examples, starts, width, prefix
        self.real = real  # [R] on the CPU: what the host decides from them needs no device sync
        if widths is None:  # [R] on the rows' device, unless the caller has them there
            widths = torch.full_like(starts, width) if real is None else real.to(starts.device)
        self.widths = widths                                                               # [R]
        offsets = torch.arange(width, device=starts.device)[None, :]
        self.positions = starts[:, None] + torch.minimum(offsets, self.widths[:, None] - 1)  # [R, W]

    def to(self, device):
        """This index with its tensors on `device` (the device of a block it is used in)."""
        if self.examples.device == device:
            return self
        return RowIndex(self.examples.to(device), self.starts.to(device), self.width, self.prefix, self.real,
                        self.widths.to(device))

    def first(self, rows):
        """The index of the first `rows` rows (runs join the batch at the end)."""
        if rows == len(self.examples):
            return self
        return RowIndex(self.examples[:rows], self.starts[:rows], self.width, self.prefix,
                        None if self.real is None else self.real[:rows], self.widths[:rows])

    def repeat(self, times):
        """This index's rows `times` over, one after another."""
        return RowIndex(self.examples.repeat(times), self.starts.repeat(times), self.width, self.prefix,
                        None if self.real is None else self.real.repeat(times), self.widths.repeat(times))

    def real_rows(self):
        """[N] the call's real positions as rows of its flattened [R x W] tokens, in order; None where every
        position is real."""
        if self.real is None or bool((self.real == self.width).all()):
            return None
        ends = self.widths.cumsum(0)                                              # [R]
        token = torch.arange(int(self.real.sum()), device=ends.device)             # [N]
        row = torch.searchsorted(ends, token, right=True)
        return row * self.width + token - (ends - self.widths)[row]

    @property
    def last(self):
        """[R] each row's last real position, as a column of the call."""
        return self.widths - 1

    @property
    def keys(self):
        prefix = torch.arange(self.prefix, device=self.starts.device).expand(len(self.examples), self.prefix)
        return torch.cat([prefix, self.positions], dim=1)                          # [R, P + W]

    @property
    def valid(self):
        prefix = torch.arange(self.prefix, device=self.starts.device)[None, :] < self.starts[:, None]
        suffix = torch.arange(self.width, device=self.starts.device)[None, :] < self.widths[:, None]
        return torch.cat([prefix, suffix], dim=1)

    def rows_in(self, tensor):
        """Each row's index into `tensor`'s first dimension: its example, or 0 where that is shared (1)."""
        return self.examples if tensor.shape[0] > 1 else torch.zeros_like(self.examples)

    def gather(self, tensor):
        """tensor [B or 1, T, ...] at each row's example and positions: [R, W, ...]."""
        return tensor[self.rows_in(tensor).to(tensor.device)[:, None], self.positions.to(tensor.device)]


@dataclass
class Group:
    """Examples of one clean batch whose runs at a site compute the same number of positions."""
    index: RowIndex           # clean-batch rows, first computed position of each, positions computed per run
    writes: tuple             # (example row, position - start, slot) of each source activation written
    span: bool                # whether these are span runs (the source sits in the prefix's keys and values)
    writes_sources: bool = True  # whether the runs write source activations (else: attention blocked)
    heads: torch.Tensor = None   # [n] the head each row patches, when the heads of a head site share the calls

    @property
    def examples(self):
        return self.index.examples

    @property
    def starts(self):
        return self.index.starts

    @property
    def width(self):
        return self.index.width


def groups(positions: list, lengths: list, use_prefix: bool, spans, layer_ids: list, max_tokens: int, device,
           edit, heads: list = ()) -> list:
    """The runs of one site on one clean batch, as chunks (Group, layer ids): examples grouped by how
    many positions each run computes (length - the first position the `edit` changes, a WriteRuns or
    BlockRuns; close widths padded to the longest, widths()) and by whether the span path applies, then
    split to the token budget `max_tokens` (runs x suffix positions per block call). With `heads` (head
    numbers), the runs of those heads of a head site: each example's rows are one per head, side by side
    (Group.heads)."""
    by_key = defaultdict(list)
    for e, ps in enumerate(positions):
        if ps:
            span = spans[e] if spans is not None else None
            first = edit.first_position(ps, int(lengths[e]))
            start = span if span is not None else (first if use_prefix else 0)
            width = int(lengths[e]) - start
            by_key[(width, span is not None)] += [(e, start, width, h) for h in (heads or [None])]
    out = []
    for span in (False, True):
        members_of_width = {width: members for (width, is_span), members in by_key.items() if is_span == span}
        for bucket in widths(members_of_width):
            members = [m for width in bucket for m in members_of_width[width]]
            for picked, lis in chunks(max_tokens, len(members), layer_ids, bucket[-1]):
                out.append((group([members[i] for i in picked], positions, bucket[-1], span, device,
                                  edit.writes_sources), lis))
    return out


def widths(members_of_width: dict) -> list:
    """The widths (positions computed per run) whose runs share block calls, as lists in increasing order:
    a width joins the calls of the narrower ones before it while padding them all to it adds at most
    PADDING of their positions (a few large calls compute at a higher rate than many small ones)."""
    buckets, real = [], 0
    for width in sorted(members_of_width):
        runs = len(members_of_width[width])
        if buckets:
            count = sum(len(members_of_width[w]) for w in buckets[-1])
            if (count + runs) * width <= (1 + PADDING) * (real + runs * width):
                buckets[-1].append(width)
                real += runs * width
                continue
        buckets.append([width])
        real = runs * width
    return buckets


def chunks(max_tokens: int, n_examples: int, layer_ids: list, width: int) -> list:
    """Split (examples, layers) so that runs x suffix width stays within the token budget."""
    runs = max(1, max_tokens // max(width, 1))
    if runs >= len(layer_ids):
        step = runs // len(layer_ids)
        return [(list(range(a, min(a + step, n_examples))), list(layer_ids))
                for a in range(0, n_examples, step)]
    return [([e], list(layer_ids[a:a + runs])) for e in range(n_examples)
            for a in range(0, len(layer_ids), runs)]


def group(members: list, positions: list, width: int, span: bool, device, writes_sources: bool = True) -> "Group":
    """The Group of `members` (example, first computed position, positions computed, head or None), padded
    to `width` positions, with the source writes of each."""
    writes = ([], [], [])
    if not span and writes_sources:
        for r, (e, start, *_) in enumerate(members):
            for slot, p in enumerate(positions[e]):
                for column, value in zip(writes, (r, p - start, slot)):
                    column.append(value)
    examples, starts, real, heads = zip(*members)
    prefix = max(starts)
    examples, starts = (torch.as_tensor(column, device=device) for column in (examples, starts))
    heads = None if heads[0] is None else torch.as_tensor(heads, device=device)
    real = torch.as_tensor(real)  # on the CPU (RowIndex.real)
    return Group(RowIndex(examples, starts, width, prefix, real),
                 tuple(torch.as_tensor(w, dtype=torch.long, device=device) for w in writes), span,
                 writes_sources, heads)


def members_of(runs: Group) -> list:
    """A group's members, as group() takes them: (example, first computed position, positions computed,
    head or None)."""
    heads = runs.heads.tolist() if runs.heads is not None else [None] * len(runs.examples)
    return list(zip(runs.examples.tolist(), runs.starts.tolist(), runs.index.real.tolist(), heads))


def split(chunk: tuple, positions: list, device):
    """A chunk that ran out of memory, halved: by examples if it has more than one, else by layers."""
    runs, lis = chunk
    members = members_of(runs)
    if len(members) > 1:
        half = len(members) // 2
        return [(group(part, positions, runs.width, runs.span, device, runs.writes_sources), lis)
                for part in (members[:half], members[half:])]
    if len(lis) > 1:
        half = len(lis) // 2
        return [(runs, lis[:half]), (runs, lis[half:])]
    return None


def spans(site, positions: list, lengths: list, first: int, available: set, n_layers: int, same_until,
          use_prefix: bool):
    """For each example, the end of its patched span if the span path applies: a resid site whose
    positions are one run [start, stop) before the last token, where target and source run the same up to
    `start` (`same_until[e]`: the first position at which they may differ, by token or by noise), with
    the source activation of every layer from the first patched one (`first`) on among the `available`
    ones (it is the input of the blocks after it). Else None; None for all when `same_until` is None (the
    intervention's source is no run). Any patch window gives the same runs as its first layer alone: the
    later layers' source activations are what the span holds there anyway."""
    if same_until is None or site.component != "resid" or not use_prefix \
            or not set(range(first, n_layers - 1)) <= available:
        return None
    out = []
    for ps, n, same in zip(positions, lengths, same_until):
        ok = ps and ps == list(range(ps[0], ps[-1] + 1)) and ps[-1] + 1 < n and ps[0] <= same
        out.append(ps[-1] + 1 if ok else None)
    return out
