"""Merge per-site, per-shard metrics into one labelled dataset with means and bootstrap intervals."""

import numpy as np
import xarray as xr
from scipy import stats

from . import heads
from .quantities import DESCRIPTIONS, METRICS, TOP_DESCRIPTIONS, log_unit, unit
from .stacking import stacked


def bootstrap_interval(values, seed, n_resamples=1000, level=0.95):
    """Percentile bootstrap interval of the mean over axis 0, for every other index at once."""
    if values.shape[0] < 2:
        mean = values.mean(axis=0)
        return mean, mean
    result = stats.bootstrap((values,), np.mean, axis=0, n_resamples=n_resamples, confidence_level=level,
                             method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    return result.confidence_interval.low, result.confidence_interval.high


def merge_sites(site_datasets, sites, base, seed):
    """Stack per-site datasets (each example x layer; x head for a head site) on a `site` dimension in
    config order and add js_mean, js_ci_low, js_ci_high and the mean of every other metric; head sites go
    along `head_site`, in the same variables named with the prefix head_ (patchmap.heads)."""
    return heads.joined(lambda group: _merged(site_datasets, group, base, seed), sites)


def _merged(site_datasets, sites, base, seed):
    per_site = [xr.concat(site_datasets[s.name], dim="example") if isinstance(site_datasets[s.name], list)
                else site_datasets[s.name] for s in sites]
    ds = stacked([d.drop_attrs() for d in per_site], "site", join="exact")
    ds = ds.assign_coords(
        site=[s.label for s in sites],
        site_name=("site", [s.name for s in sites]),
        component=("site", [s.component for s in sites]),
        positions=("site", [s.positions for s in sites]),
    ).transpose("example", "site", "layer", ...)
    for name in TOP_DESCRIPTIONS:
        if name in ds:
            ds[name].attrs["description"] = TOP_DESCRIPTIONS[name]
            if name.endswith("prob"):
                ds[name].attrs["units"] = "probability"
    for name in METRICS:
        ds[name].attrs.update(description=DESCRIPTIONS[name], units=unit(name, base))
        ds[f"{name}_mean"] = ds[name].astype("float64").mean("example")
        ds[f"{name}_mean"].attrs.update(description=f"mean over examples of {name}", units=ds[name].attrs["units"])
    low, high = bootstrap_interval(ds["js"].values.astype(np.float64), seed)
    for name, end, values in (("js_ci_low", "low", low), ("js_ci_high", "high", high)):
        ds[name] = (ds["js_mean"].dims, np.asarray(values),
                    {"description": f"bootstrap 95% interval of js_mean, {end} end", "units": log_unit(base)})
    ds["layer"].attrs["description"] = "decoder block index, 0 = first"
    ds["example"].attrs["description"] = "id of the target fact"
    ds["site"].attrs["description"] = "row label: a component at a group of token positions"
    if "head" in ds.coords:
        ds["head"].attrs["description"] = heads.HEAD
    return ds
