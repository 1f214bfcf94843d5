"""Head sites in result files. A head site's metrics have a `head` dimension ([example, layer, head]), so
they cannot share the `site` dimension of the other sites' [example, site, layer] variables. A result file
keeps the other sites exactly as before and stacks the head sites along a dimension of their own,
`head_site`, in variables and coordinates named like the others with the prefix `head_`: head_js [example,
head_site, layer, head], head_js_mean [head_site, layer, head], head_site_name, head_positions, ... A run
of head sites only has only these. Plain xarray, without torch (the jobs that merge and plot read it)."""

import xarray as xr

from .quantities import TARGET_TOP

PREFIX = "head_"
SHARED = ("example", "layer", "head", "rank", *TARGET_TOP)  # names kept: shared dimensions, per-example variables
HEAD = "attention head (query head) index, 0 = first"  # the `head` coordinate's description


def groups(sites: list) -> list:
    """[(prefix, sites)]: the sites without heads (prefix ""), then the head sites (prefix "head_"), each
    where there are any, in the sites' order."""
    plain = [s for s in sites if not s.has_heads]
    heads = [s for s in sites if s.has_heads]
    return [(prefix, group) for prefix, group in (("", plain), (PREFIX, heads)) if group]


def joined(stack, sites: list) -> xr.Dataset:
    """stack(sites) of each group (a dataset along `site`), the head sites' prefixed, merged into one."""
    parts = [prefixed(stack(group), prefix) for prefix, group in groups(sites)]
    return parts[0] if len(parts) == 1 else xr.merge(parts, join="exact", compat="no_conflicts", combine_attrs="override")


def prefixed(ds: xr.Dataset, prefix: str) -> xr.Dataset:
    """`ds` with every variable, coordinate and dimension but SHARED named with `prefix` (as it is for "")."""
    if not prefix:
        return ds
    return ds.rename({name: prefix + name for name in [*ds.variables, *ds.dims] if name not in SHARED})


def one_site(ds: xr.Dataset, site, coordinates: tuple) -> xr.Dataset:
    """One site's variables, unprefixed and without the site dimension and the stacked `coordinates` (e.g.
    label, component, positions), from a dataset of stacked sites (`joined`)."""
    prefix = PREFIX if site.has_heads else ""
    if PREFIX + "site" in ds.dims:  # head sites in the file: keep this site's group only
        ds = ds[[v for v in ds.data_vars if prefix + "site" in ds[v].dims or v in TARGET_TOP]]
        if prefix:
            ds = ds.rename({name: name[len(prefix):] for name in [*ds.variables, *ds.dims] if name not in SHARED})
    return ds.drop_vars(list(coordinates)).sel(site=site.name, drop=True)
