"""The numbers behind a heatmap, as text: `python -m patchmap.summary results/default/divergence.nc`
prints the mean JS of each site and layer, the pair counts, and how the default figure's three rows
compare with JS(source, target)."""

import argparse

import xarray as xr

SUBJECT, ATTENTION, LAST = "Subj.", "Attn.", "Last."


def js_table(ds, digits=2):
    """js_mean as text: one row per site, one column per layer."""
    frame = ds["js_mean"].to_pandas().round(digits)
    frame.columns = [str(c) for c in frame.columns]
    frame.columns.name = "layer"
    return frame.to_string()


def counts(ds):
    return {k[len("count_"):]: int(v) for k, v in ds.attrs.items() if k.startswith("count_")}


def plateau(js_mean):
    """Mean JS(source, target): under a full-residual swap, the last token's residual at the final layer
    fixes the output, so the `Last.` row ends at exactly this value."""
    return float(js_mean.sel(site=LAST).isel(layer=-1))


def subject_ratio(js_mean):
    """`Subj.` at the first layer over mean JS(source, target): near 1 when the source differs from the
    target only in the subject (the subject then carries the whole difference)."""
    return float(js_mean.sel(site=SUBJECT).isel(layer=0)) / plateau(js_mean)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m patchmap.summary", description=__doc__)
    parser.add_argument("divergence", help="a divergence.nc written by the workflow or patch_heatmap")
    args = parser.parse_args(argv)
    ds = xr.load_dataset(args.divergence)
    print(js_table(ds))
    print("pairs:", ", ".join(f"{k} {v}" for k, v in counts(ds).items()))
    sites = list(ds["site"].values)
    if SUBJECT in sites and LAST in sites:
        js_mean = ds["js_mean"]
        print(f"mean JS(source, target) = {LAST} at the last layer = {plateau(js_mean):.3f}; "
              f"{SUBJECT} at layer 0 / that = {subject_ratio(js_mean):.3f}")


if __name__ == "__main__":
    main()
