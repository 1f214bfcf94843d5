"""Source activations: what the extract stage records of the source prompts, at every site and every layer
a patch window touches (patchmap.ablation pools them for the ablate intervention)."""

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from .engines.hooks import capture, pad_batch
from .job import batches
from .models import component_width, input_device
from .encoding import token_lists
from .sites import site_positions


@torch.no_grad()
def extract_activations(model, pairs: xr.Dataset, sites: list, layers: list, batch_size: int, pad_id: int,
                        progress: bool = True) -> xr.Dataset:
    """Source activations at each site's positions, every layer in `layers`: `act_<site>` [example,
    layer, slot, hidden] per site (slot = index within the position group; NaN past a group's end; hidden:
    for a head site every head's output side by side, heads x head dim) and `pos_<site>` [example, slot],
    each slot's token position (-1: unused)."""
    device = input_device(model)
    sources = token_lists(pairs, "source_ids")
    components = sorted({s.component for s in sites})
    pos = {s.name: site_positions(pairs, s) for s in sites}
    n = len(sources)
    out = {s.name: np.full((n, len(layers), max((len(p) for p in pos[s.name]), default=0),
                            component_width(model, s.component)), np.nan, dtype=np.float32) for s in sites}
    for a, b in tqdm(batches(n, batch_size), desc="extract", unit="batch", disable=not progress):
        ids, mask, position_ids, lengths = pad_batch(sources[a:b], pad_id, device)
        store, _ = capture(model, ids, mask, position_ids, lengths, components, layers)
        for s in sites:
            for li, layer in enumerate(layers):
                act = store[(s.component, layer)].float().cpu().numpy()
                for i, ps in enumerate(pos[s.name][a:b]):
                    out[s.name][a + i, li, :len(ps)] = act[i, ps]
    data, coords = {}, {"example": pairs["example"].values, "layer": np.asarray(layers)}
    for s in sites:
        slots = out[s.name].shape[2]
        idx = np.full((n, slots), -1, dtype=np.int32)
        for i, ps in enumerate(pos[s.name]):
            idx[i, :len(ps)] = ps
        data[f"act_{s.name}"] = (("example", "layer", f"slot_{s.name}", "hidden"), out[s.name],
                                 {"site": s.label, "component": s.component, "positions": s.positions,
                                  "description": "source activation at the site's positions"})
        data[f"pos_{s.name}"] = (("example", f"slot_{s.name}"), idx,
                                 {"description": "token position of each slot; -1 = unused"})
    return xr.Dataset(data, coords=coords)
