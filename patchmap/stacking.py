"""Stacking per-site results along a dimension (sites, a head site's heads): every variable is stacked but
those that are the same for every site, the unpatched target's top tokens (quantities.TARGET_TOP), which
are kept once. Plain xarray, without torch."""

import xarray as xr

from .quantities import TARGET_TOP


def stacked(datasets: list, dim: str, **options) -> xr.Dataset:
    """xr.concat(datasets, dim, **options), the TARGET_TOP variables (absent from results made before them)
    taken once, from the first."""
    once = [name for name in TARGET_TOP if name in datasets[0]]
    ds = xr.concat([d.drop_vars(once) for d in datasets], dim=dim, **options)
    for name in once:
        ds[name] = datasets[0][name]
    return ds
