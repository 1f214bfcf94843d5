"""The numbers behind a heatmap, as text: `python -m patchmap.summary results/default/divergence.nc`
prints the mean JS of each site and layer (and of each head site's heads), the pair counts, and how the
default figure's three rows compare with JS(source, target)."""

import argparse
import os
import sys

import xarray as xr

from .shards import SHORTFALL

SUBJECT, ATTENTION, LAST = "Subj.", "Attn.", "Last."


def js_table(ds, digits=2):
    """js_mean as text: one row per site, one column per layer."""
    frame = ds["js_mean"].to_pandas().round(digits)
    frame.columns = [str(c) for c in frame.columns]
    frame.columns.name = "layer"
    return frame.to_string()


def head_table(ds, head_site, digits=2):
    """A head site's head_js_mean as text: one row per layer, one column per head."""
    frame = ds["head_js_mean"].sel(head_site=head_site).to_pandas().round(digits)
    frame.columns = [str(c) for c in frame.columns]
    frame.columns.name = "head"
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


def three_stages(js_mean):
    """The paper figure's three stages, read off a Subj./Attn./Last. swap heatmap. P = mean JS(source,
    target). `Subj.` falls: from at least 0.8 P at layer 0 to at most 0.1 P at the last layer. `Last.`
    rises: from at most 0.5 P at layer 0 to P. `Attn.` peaks where `Subj.` falls: its highest layer lies
    in the fall, from the first layer where `Subj.` has lost a tenth of its layer-0 value to the first
    where it is below 0.1 P."""
    p = plateau(js_mean)
    subj = js_mean.sel(site=SUBJECT).values
    last = js_mean.sel(site=LAST).values
    attn = js_mean.sel(site=ATTENTION).values
    fall_start = next((l for l, v in enumerate(subj) if v < 0.9 * subj[0]), len(subj) - 1)
    fall_end = next((l for l, v in enumerate(subj) if v < 0.1 * p), len(subj) - 1)
    peak = int(attn.argmax())
    return {
        "plateau": p,
        "subject_falls": bool(subj[0] >= 0.8 * p and subj[-1] <= 0.1 * p),
        "last_rises": bool(last[0] <= 0.5 * p),
        "subject_fall_layers": (int(fall_start), int(fall_end)),
        "attention_peak_layer": peak,
        "attention_peaks_in_the_fall": bool(fall_start <= peak <= fall_end),
    }


def print_summary(ds):
    if "site" in ds.dims:
        print(js_table(ds))
    for head_site in ds["head_site"].values if "head_site" in ds.dims else []:
        print(f"{head_site}: mean JS per layer and head\n{head_table(ds, head_site)}")
    print("pairs:", ", ".join(f"{k} {v}" for k, v in counts(ds).items()))
    if SHORTFALL in ds.attrs:
        print(ds.attrs[SHORTFALL])
    sites = list(ds["site"].values) if "site" in ds.dims else []
    if SUBJECT in sites and LAST in sites:
        js_mean = ds["js_mean"]
        print(f"mean JS(source, target) = {LAST} at the last layer = {plateau(js_mean):.3f}; "
              f"{SUBJECT} at layer 0 / that = {subject_ratio(js_mean):.3f}")
        if ATTENTION in sites:
            print("three stages:", ", ".join(f"{k} {v}" for k, v in three_stages(js_mean).items()))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m patchmap.summary", description=__doc__)
    parser.add_argument("divergence", help="a divergence.nc written by the workflow or patch_heatmap")
    args = parser.parse_args(argv)
    try:
        ds = xr.load_dataset(args.divergence)
    except (OSError, ValueError) as e:
        sys.exit(f"patchmap: cannot read {args.divergence} as a netCDF file ({e}); give a run's divergence.nc")
    if "js_mean" not in ds and "head_js_mean" not in ds:
        sys.exit(f"patchmap: {args.divergence} holds no js_mean: is it a run's divergence.nc?")
    sys.stdout.reconfigure(errors="backslashreplace")  # a site label the terminal cannot encode
    try:
        print_summary(ds)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (`| head`): nothing left to say, and nothing to flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
