"""The patched runs of one or more sites through the decoder blocks: each run joins at the block where its
window's first edit happens, and every run active at a block shares one call of it, whatever its site."""

from collections import defaultdict
from dataclasses import dataclass

import torch

from ...job import window_layers
from .schedule import Group, RowIndex


@dataclass
class Part:
    """The runs of one site (or of the heads of a head site) in a chunk of block calls: the runs of `group`
    (a schedule.Group) at each of the layers `layer_ids`, edited by `edit` (a WriteRuns or BlockRuns)."""
    group: Group
    layer_ids: list
    edit: object
    numbers: list          # the job's site numbers of the runs (one per head of a head site sharing the calls)
    heads: list            # the heads of those sites, [] for a site that is not one head's

    @property
    def tokens(self) -> int:
        """Runs x positions computed per block call, at most."""
        return len(self.group.examples) * len(self.layer_ids) * self.group.width


@torch.no_grad()
def run_parts(engine, clean, parts: list, layers: list, keys_values_of, window: int = 1) -> list:
    """The runs of `parts` (Part, all of one width) through the blocks, sharing every block call; the run
    of part p for layer id li edits every layer of window_layers(layers[li], window); `keys_values_of(block)`
    gives the prefix keys and values of a block. Returns (part number, layer id, last-position hidden
    states [n, H]) for each run, n its part's examples (rows)."""
    # 1. where each run joins (edit.join_block: its window's first block, or the one after it)
    windows, joins = {}, defaultdict(list)  # (part, layer id) -> window; block -> runs joining there
    for p, part in enumerate(parts):
        for li in part.layer_ids:
            windows[p, li] = window_layers(layers[li], window, engine.n_layers)
            joins[part.edit.join_block(windows[p, li][0])].append((p, li))
    width, prefix = parts[0].group.width, max(part.group.index.prefix for part in parts)
    hidden, runs, rows, index = None, [], [], None  # runs: (part, layer id, first row) in the order they joined
    for block in range(min(joins), engine.n_layers + 1):
        # 2. the runs joining here enter with the clean block input (or output, source written in)
        for p, li in joins.get(block, []):
            group = parts[p].group
            joining = parts[p].edit.joining(clean, group, block, windows[p, li][0])
            runs.append((p, li, 0 if hidden is None else hidden.shape[0]))
            rows.append(group.index)
            hidden = joining if hidden is None else torch.cat([hidden.to(joining.device), joining])
            index = None
        if block == engine.n_layers:
            break
        # 3. one call of the block for every active run, edited in the runs whose window holds this block
        index = index or joined_index(rows, width, prefix)
        active = [[first for q, li, first in runs if q == p and block in windows[q, li]] for p in range(len(parts))]
        edits = [part.edit.in_block(part.group, firsts, index, block) for part, firsts in zip(parts, active)]
        hidden = engine.call_block(clean, block, hidden, index, keys_values_of(block),
                                   mlp="last" if block == engine.n_layers - 1 else "all", **combined(edits))
        # 4. what the edits write into the block's output (the next block's input)
        for part, firsts in zip(parts, active):
            hidden = part.edit.after_block(hidden, part.group, firsts, block)
    index = index or joined_index(rows, width, prefix)
    engine.stats["patched_runs"] += hidden.shape[0]
    engine.stats["span_runs"] += hidden.shape[0] if parts[0].group.span else 0
    engine.stats["padded_runs"] += 0 if index.widths is None else int((index.widths < width).sum())
    last = index.last.to(hidden.device)
    out = hidden[torch.arange(len(last), device=hidden.device), last]
    return [(p, li, out[first:first + len(parts[p].group.examples)]) for p, li, first in runs]


def joined_index(indices: list, width: int, prefix: int) -> RowIndex:
    """One RowIndex of the rows of `indices` (RowIndex of as many width) one after another, prefix `prefix`."""
    if len(indices) == 1 and indices[0].prefix == prefix:
        return indices[0]
    widths = None
    if any(index.widths is not None for index in indices):
        widths = torch.cat([index.widths if index.widths is not None else torch.full_like(index.examples, width)
                            for index in indices])
    return RowIndex(torch.cat([index.examples for index in indices]), torch.cat([index.starts for index in indices]),
                    width, prefix, widths)


def combined(edits: list) -> dict:
    """call_block's keyword arguments for the edits of several parts (each a dict from Part.edit.in_block):
    every part's writes, and the keys blocked in any."""
    writes = [edit["write"] for edit in edits if "write" in edit]
    blocked = [edit["blocked"] for edit in edits if "blocked" in edit]
    out = {"writes": writes} if writes else {}
    if blocked:
        out["blocked"] = torch.stack(blocked).any(0) if len(blocked) > 1 else blocked[0]
    return out
