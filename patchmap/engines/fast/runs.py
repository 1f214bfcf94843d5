"""The patched runs of one group through the decoder blocks: each run joins at the block where its
window's first edit happens, and every run active at a block shares one call of it."""

from collections import defaultdict

import torch

from ...job import window_layers


@torch.no_grad()
def run_group(engine, clean, group, layer_ids: list, layers: list, edit, keys_values_of, window: int = 1):
    """(hidden, order, unchanged): last-position hidden states [len(layer_ids) * len(group.examples), H] of
    the runs (example, layer) of `group` (a schedule.Group: examples sharing a suffix width, the narrower
    ones padded to it), rows layer-major in the returned order of layer ids, and [R] (CPU) which of them
    are the clean run's own (unchanged()). The run for layer l edits (`edit`: a WriteRuns or BlockRuns)
    every layer of window_layers(l, window); `keys_values_of(block)` gives the prefix keys and values of a
    block."""
    # 1. where each run joins (edit.join_block: its window's first block, or the one after it)
    n, width = len(group.examples), group.width
    windows = {li: window_layers(layers[li], window, engine.n_layers) for li in layer_ids}
    joins = defaultdict(list)  # block index -> layer ids joining there
    for li in layer_ids:
        joins[edit.join_block(windows[li][0])].append(li)
    full = group.index.repeat(len(layer_ids))
    hidden, order = None, []
    for block in range(min(joins), engine.n_layers + 1):
        # 2. the runs joining here enter with the clean block input (or output, source written in)
        for li in joins.get(block, []):
            joining = edit.joining(clean, group, block, windows[li][0])
            hidden = joining if hidden is None else torch.cat([hidden.to(joining.device), joining])
            order.append(li)
        if block == engine.n_layers:
            break
        # 3. one call of the block for every active run, edited in the runs whose window holds this block
        index = full.first(len(order) * n)
        runs = [i for i, li in enumerate(order) if block in windows[li]]
        hidden = engine.call_block(clean, block, hidden, index, keys_values_of(block),
                                   mlp="last" if block == engine.n_layers - 1 else "all",
                                   **edit.in_block(group, runs, n, index, block, len(order)))
        # 4. what the edit writes into the block's output (the next block's input)
        hidden = edit.after_block(hidden, group, runs, n, block)
    engine.stats["patched_runs"] += hidden.shape[0]
    engine.stats["span_runs"] += hidden.shape[0] if group.span else 0
    engine.stats["padded_runs"] += int((group.index.widths < width).sum()) * len(order)
    last = full.last.to(hidden.device)
    return hidden[torch.arange(len(last), device=hidden.device), last], order, \
        unchanged(group, order, joins.get(engine.n_layers, []))


def unchanged(group, order: list, after_last: list) -> torch.Tensor:
    """[len(order) * len(group.examples)] (CPU), rows as run_group returns them: true for the runs that
    joined after the last block (`after_last`: their layer ids) with nothing written at their last
    position (e.g. a resid patch at the last layer before the last token): no block computes for them, and
    their last position holds the clean run's output."""
    n = len(group.examples)
    out = torch.zeros(len(order) * n, dtype=torch.bool)
    if not after_last:
        return out
    rows, positions, _ = (w.cpu() for w in group.writes)
    written = torch.zeros(n, dtype=torch.bool)
    written[rows[positions == group.index.last.cpu()[rows]]] = True
    for i, li in enumerate(order):
        if li in after_last:
            out[i * n:(i + 1) * n] = ~written
    return out
