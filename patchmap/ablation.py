"""The ablate intervention's values: zero, or the mean of the source activations over every example of
the run (all extract shards), and their broadcast to the examples of one patch job. numpy and xarray only:
the ablation stage runs no model."""

import numpy as np
import xarray as xr


def ablation_values(activation_datasets: list, value: str) -> xr.Dataset:
    """Per site (each `act_<site>` variable of the extracted shards, [example, layer, slot, H]): zero, or the
    mean over every example per layer and slot (position within the group), [layer, slot, H]. Shards may
    differ in their number of slots (a group's longest span in each): the values have the most."""
    first = activation_datasets[0]
    data = {}
    for name in (n for n in first.data_vars if n.startswith("act_")):
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
        data[name] = (("layer", first[name].dims[2], "hidden"), out.astype(np.float32),
                      {"description": f"{value} ablation value per layer and slot (position within the group)"})
    return xr.Dataset(data, coords={"layer": first["layer"].values}, attrs={"value": value})


def broadcast_ablation(ablation: xr.Dataset, pairs: xr.Dataset) -> xr.Dataset:
    """The ablation values as an activations dataset for the examples of `pairs` (every example gets them)."""
    n = pairs.sizes["example"]
    data = {name: (("example", *var.dims), np.broadcast_to(var.values, (n, *var.shape)).copy())
            for name, var in ablation.data_vars.items()}
    return xr.Dataset(data, coords={"example": pairs["example"].values, "layer": ablation["layer"].values})
