"""The fast engine's side of the two strategies (patchmap.engines.strategies): how the runs of one site on
one clean batch join the block calls and what each call does to them.

- WriteRuns: a run of a window [a, b) joins at block a with the clean block input, and a hook rewrites the
  component's output in blocks a .. b - 1; for resid it joins at block a + 1 with block a's clean output
  rewritten, and the output of blocks a + 1 .. b - 1 is rewritten too. No block before a is recomputed.
- BlockRuns: a run joins at block a, computes the last position only, and that query may not attend to
  the site's positions in blocks a .. b - 1.
"""

import numpy as np
import torch

from .blocks import write_rows


class Sources:
    """The source activations of one site for the examples a..b of a clean batch, by model layer: one row
    per clean-run row (each example's `samples` copies share its source)."""

    def __init__(self, acts, site, a: int, b: int, engine, samples: int = 1):
        self.values = torch.from_numpy(np.ascontiguousarray(acts[f"act_{site.name}"].values[a:b])).to(
            engine.device, engine.dtype)                                     # [B, layer, slot, H]
        if samples > 1:
            self.values = self.values.repeat_interleave(samples, dim=0)     # [B x samples, layer, slot, H]
        self.index = {int(layer): i for i, layer in enumerate(acts["layer"].values)}

    def __call__(self, rows: torch.Tensor, slots: torch.Tensor, layer: int) -> torch.Tensor:
        """[len(rows), H]: clean-batch row rows[i], slot slots[i], at model layer `layer`."""
        return self.values[rows, self.index[layer], slots]

    def span(self, rows: torch.Tensor, width: int, layer: int) -> torch.Tensor:
        """[len(rows), width, H]: the first `width` slots of each row at model layer `layer`."""
        return self.values[rows, self.index[layer], :width]


class WriteRuns:
    """Runs that write combine(base, source) at the site's positions of `component`."""
    writes_sources = True

    def __init__(self, engine, component: str, sources: Sources, combine, per_head: dict = None):
        self.engine, self.component, self.sources, self.combine = engine, component, sources, combine
        self.per_head = per_head  # {head: combine on its slice}, when the heads of a head site share the calls
        self.into_output = component == "resid"  # a resid source goes into a block's output

    def first_position(self, positions: list, length: int) -> int:
        """The first position a run computes (earlier ones are the clean run's)."""
        return min(positions)

    def join_block(self, first_layer: int) -> int:
        """The block at which a run whose window starts at `first_layer` joins."""
        return first_layer + (1 if self.into_output else 0)

    def joining(self, clean, group, block: int, first_layer: int) -> torch.Tensor:
        """[n, W, H]: the group's runs of one layer as they join at `block`: the clean block input, or
        (resid) the clean output of their window's first layer with the source written in."""
        if not self.into_output:
            return group.index.gather(clean.inputs[block])
        rows, positions, slots = group.writes
        return write_rows(group.index.gather(clean.block_output(first_layer)), rows, positions,
                          self._new_values(self.sources(group.examples[rows], slots, first_layer),
                                           None if group.heads is None else group.heads[rows]))

    def in_block(self, group, runs: list, n: int, index, block: int, n_runs: int) -> dict:
        """call_block's edit of the runs `runs` (indices in the call's order, n rows each) whose window
        holds `block`: a hook that writes into the component's output (not for resid)."""
        write = None if self.into_output else self._writes(group, runs, n, block)
        if write is None:
            return {}
        return {"write": (self.component, *write)}

    def after_block(self, hidden: torch.Tensor, group, runs: list, n: int, block: int) -> torch.Tensor:
        """hidden [R, W, H] after the block: for resid, the source written into the runs' block output."""
        write = self._writes(group, runs, n, block) if self.into_output else None
        return hidden if write is None else write_rows(hidden, *write)

    def _new_values(self, source, heads=None):
        """The function that makes the written values [N, H] from the ones there (`base`) and `source`; with
        `heads` [N], each row's from its head's combine (per_head), as that head's own runs would."""
        if heads is None:
            return lambda base: self.combine(base, source.to(base.device, base.dtype))

        def by_head(base):
            here, of_row = source.to(base.device, base.dtype), heads.to(base.device)
            out = base.clone()
            for head in of_row.unique().tolist():
                rows = of_row == head
                out[rows] = self.per_head[head](base[rows], here[rows])
            return out
        return by_head

    def _writes(self, group, runs, n, layer):
        """(rows, positions, new_values) of the writes at `layer` into `runs`; None if nothing is written."""
        rows, positions, slots = group.writes
        if not runs or len(rows) == 0:
            return None
        offsets = torch.as_tensor(runs, device=rows.device).repeat_interleave(len(rows)) * n
        source = self.sources(group.examples[rows], slots, layer).repeat(len(runs), 1)
        heads = None if group.heads is None else group.heads[rows].repeat(len(runs))
        return rows.repeat(len(runs)) + offsets, positions.repeat(len(runs)), self._new_values(source, heads)


class BlockRuns:
    """Runs whose last position may not attend to the site's positions (`site_mask` [B, T])."""
    writes_sources = False
    sources = None

    def __init__(self, site_mask: torch.Tensor):
        self.site_mask = site_mask

    def first_position(self, positions: list, length: int) -> int:
        return length - 1  # only the last position's attention changes

    def join_block(self, first_layer: int) -> int:
        return first_layer

    def joining(self, clean, group, block: int, first_layer: int) -> torch.Tensor:
        return group.index.gather(clean.inputs[block])

    def in_block(self, group, runs: list, n: int, index, block: int, n_runs: int) -> dict:
        """The keys [R, P + W] that each row's last query may not attend to, in the runs whose window holds
        the block."""
        in_window = torch.zeros(n_runs, dtype=torch.bool, device=self.site_mask.device)
        in_window[runs] = True
        keys = index.keys.clamp(max=self.site_mask.shape[1] - 1)
        blocked = self.site_mask[index.examples[:, None], keys] & index.valid & in_window.repeat_interleave(n)[:, None]
        return {"blocked": blocked}

    def after_block(self, hidden, group, runs, n, block):
        return hidden
