"""Source activations: the extract stage (each shard's source activations at every site and layer a
patch window touches) and the ablation stage (their zero or mean, for the ablate intervention)."""

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from .engines.hooks import capture, pad_batch
from .job import batches
from .models import input_device
from .pairs import token_lists
from .sites import site_positions


@torch.no_grad()
def extract_activations(model, pairs, sites, layers, batch_size, pad_id, progress=True):
    """Source activations at each site's positions, every layer: one [example, layer, slot, hidden]
    array per site (slot = index within the position group; NaN past a group's end)."""
    device = input_device(model)
    sources = token_lists(pairs, "source_ids")
    components = sorted({s.component for s in sites})
    pos = {s.name: site_positions(pairs, s) for s in sites}
    n, hidden = len(sources), model.config.hidden_size
    out = {s.name: np.full((n, len(layers), max((len(p) for p in pos[s.name]), default=0), hidden),
                           np.nan, dtype=np.float32) for s in sites}
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


def ablation_values(activation_datasets, sites, value):
    """The ablate intervention's activations per site: zero, or the mean over every example (per layer
    and slot, i.e. position within the group) of the activations from all extract shards. Shards may
    differ in their number of slots (a group's longest span in each): the values have the most."""
    first = activation_datasets[0]
    data = {}
    for s in sites:
        name = f"act_{s.name}"
        _, layers, _, hidden = first[name].shape
        slots = max(ds[name].shape[2] for ds in activation_datasets)
        total = np.zeros((layers, slots, hidden), dtype=np.float64)
        count = np.zeros((layers, slots, 1), dtype=np.int64)
        for ds in activation_datasets:
            arr = ds[name].values.astype(np.float64)  # [example, layer, slot, H]
            present = ~np.isnan(arr[..., :1])
            total[:, :arr.shape[2]] += np.nansum(arr, axis=0)
            count[:, :arr.shape[2]] += present.sum(axis=0)
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        out = np.zeros_like(mean) if value == "zero" else mean
        data[name] = (("layer", f"slot_{s.name}", "hidden"), out.astype(np.float32),
                      {"description": f"{value} ablation value per layer and slot (position within the group)"})
    return xr.Dataset(data, coords={"layer": first["layer"].values}, attrs={"value": value})


def broadcast_ablation(ablation, pairs):
    """The ablation values as an activations dataset for the examples of `pairs` (every example gets them)."""
    n = pairs.sizes["example"]
    data = {name: (("example", *var.dims), np.broadcast_to(var.values, (n, *var.shape)).copy())
            for name, var in ablation.data_vars.items()}
    return xr.Dataset(data, coords={"example": pairs["example"].values, "layer": ablation["layer"].values})
