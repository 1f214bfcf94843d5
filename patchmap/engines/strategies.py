"""What a patched run does at its site, the one thing the engines call on an intervention (its
`strategy`): Write (the site's activation becomes combine(base, source) at the site's positions, in every
layer of the window) or Block (the last position's attention to the site's positions is blocked there).
Each gives the reference engine its hooks and the fast engine its runs (patchmap.engines.fast.edits). At one
head of a head site (patchmap.sites), a write changes that head's slice of the activation only."""

import torch

from ..models import attention_module, head_shape
from .fast.edits import BlockRuns, Sources, WriteRuns
from .hooks import edit_hook, knockout_hook, replacing


def reference_source_values(acts, site, positions: list, width: int, hidden: int, a: int, b: int) -> dict:
    """{layer: [B, T, H]} with the source activation of examples a..b at each one's site positions."""
    arr = acts[f"act_{site.name}"].values[a:b]  # [B, layer, slot, H]
    values = {}
    for li, layer in enumerate(acts["layer"].values.tolist()):
        v = torch.zeros(b - a, width, hidden)
        for i, ps in enumerate(positions[a:b]):
            v[i, ps] = torch.from_numpy(arr[i, li, :len(ps)])
        values[layer] = v
    return values


def on_head(combine, head: int, head_dim: int):
    """combine(base, source) on one head's slice [..., head_dim] of a head site's activations [..., heads x
    head_dim]; the other heads keep base."""
    low, high = head * head_dim, (head + 1) * head_dim

    def combined(base, source):
        return torch.cat([base[..., :low], combine(base[..., low:high], source[..., low:high]), base[..., high:]], -1)
    return combined


class Write:
    """The site's activation becomes combine(base, source) at its positions: base is the activation there
    in the patched run, source the source activation (both [..., H]); at one head of a head site, that
    head's slice [..., head dim] of them."""

    def __init__(self, combine):
        self.combine = combine

    def combine_at(self, model, site):
        """What the runs of `site` write: combine, or at one head of a head site combine on its slice."""
        return self.combine if site.head is None else on_head(self.combine, site.head, head_shape(model)[1])

    def reference_values(self, sources, site, positions, width, hidden, a, b):
        return reference_source_values(sources, site, positions, width, hidden, a, b)

    def reference_hooks(self, model, site, layers: list, where: torch.Tensor, values: dict,
                        lengths: torch.Tensor) -> list:
        """Hooks that write into the site's component of each layer in `layers` where `where` [B, T] is true."""
        combine = self.combine_at(model, site)
        return [edit_hook(model, site.component, layer, replacing(where, values[layer], combine)) for layer in layers]

    shares_heads = True  # the heads of a head site can share the fast engine's block calls

    def fast_runs(self, engine, sources, site, batch, positions: list, heads: list = ()) -> WriteRuns:
        """The fast engine's runs of `site` on a clean batch (patchmap.engines.fast.driver.Batch); `positions`:
        the site's in each of its examples. With `heads`, the runs of those heads of head site `site` at once,
        each row writing its own head's slice (schedule.Group.heads)."""
        per_head = None
        if heads:
            per_head = {h: on_head(self.combine, h, head_shape(engine.model)[1]) for h in heads}
        return WriteRuns(engine, site.component, Sources(sources, site, batch.a, batch.b, engine, batch.samples),
                         self.combine_at(engine.model, site), per_head)


class Block:
    """The last position may not attend to the site's positions (its component is ignored)."""
    shares_heads = False  # knockout of one head's edges is refused (interventions.Knockout.site_problem)

    def reference_values(self, sources, site, positions, width, hidden, a, b):
        return None

    def reference_hooks(self, model, site, layers, where, values, lengths):
        """Forward pre-hooks on each layer's attention that block the last query's edges to `where` [B, T]."""
        return [(attention_module(model, layer), knockout_hook(where, lengths - 1), "pre") for layer in layers]

    def fast_runs(self, engine, sources, site, batch, positions, heads: list = ()) -> BlockRuns:
        """The fast engine's runs of `site` on a clean batch (never shared by heads: shares_heads)."""
        site_mask = torch.zeros(len(positions), int(max(batch.lengths)), dtype=torch.bool)  # [B, T]
        for e, ps in enumerate(positions):
            site_mask[e, ps] = True
        return BlockRuns(site_mask.to(engine.device))
