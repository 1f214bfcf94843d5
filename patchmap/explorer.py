"""results/{run}/explorer.html: one self-contained page to explore a run in a browser.

The page draws, from divergence.nc and pairs.nc, the heatmap of a chosen metric (mean over the chosen
examples per site and layer, with its 95% interval and the number of examples on hover), the selected
site's per-layer line with its interval band, and a clicked cell's examples sorted by the metric (prompts,
answers, p(answer) unpatched and patched, the patched run's top tokens). A relation filter and a text filter
choose the examples; every mean is computed again over them in the page.

It draws with plotly.js, in its official partial bundle of cartesian traces (patchmap/vendor: a third of
the full bundle, which a browser takes twice as long to start). Everything is inline: plotly.js, the page's
script (explorer.js) and the data, so the
page needs no network and no server and opens from file://. To keep a paper-sized run (1,209 examples x 3
sites x 32 layers) under 10 MB, plotly.js and the data are deflated and base64-encoded; the page inflates
them with the browser's DecompressionStream. The numbers are the files' own float32 values, not rounded.

Problems that leave the page useful (a run made before the top tokens were stored, one example, a site
without finite values) are notices at the top of the page; input the page cannot be drawn from is a
UserError.
"""

import base64
import html
import json
import logging
import re
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import xarray as xr

from . import provenance
from .errors import UserError
from .quantities import DESCRIPTIONS, METRICS
from .storage import atomic_path

log = logging.getLogger("patchmap")

HERE = Path(__file__).resolve().parent

# The top-token contract: the engines store these in the patch files and divergence.nc. rank 0 is the most
# likely token and probabilities do not increase with rank. token_text (dimension and int64 coordinate
# token_id) holds the decoded text of every id in top_token, target_top_token and pairs.nc's answers.
TOP_TOKENS = {
    "top_token": (("example", "site", "layer", "rank"), "i"),  # int32: the patched run's most likely ids
    "top_prob": (("example", "site", "layer", "rank"), "f"),  # float32: their probabilities
    "target_top_token": (("example", "rank"), "i"),  # int32: the unpatched target's
    "target_top_prob": (("example", "rank"), "f"),  # float32
    "token_text": (("token_id",), "OU"),  # str
}
NO_TOP_TOKENS = ("this run's results hold no top tokens (they were made before patchmap stored them): rerun its "
                 "patch jobs to get them, e.g. snakemake --cores all --forcerun patch patch_without_extraction")

# the metric selector's names; the per-example metrics are quantities.METRICS
LABELS = {"js": "JS divergence", "kl_patched_target": "KL(patched ‖ target)",
          "kl_target_patched": "KL(target ‖ patched)", "p_target_answer": "p(target answer)",
          "p_source_answer": "p(source answer)", "flip": "flip rate"}
EXAMPLE_COORDS = ("target_prompt", "source_prompt", "target_attribute", "source_attribute", "relation")
PAIRS_VARIABLES = ("target_prompt", "target_subject", "source_subject", "target_answer", "source_answer",
                   "target_p_answer")


def write_explorer(divergence_path, pairs_path, out):
    """results/{run}/explorer.html from the run's divergence.nc and pairs.nc (nothing is written on failure)."""
    ds, pairs = xr.load_dataset(divergence_path), xr.load_dataset(pairs_path)
    try:
        page = explorer_html(ds, pairs)
    except UserError as error:
        raise UserError(f"cannot draw the explorer of {divergence_path}: {error}") from None
    with atomic_path(out) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    rows = with_heads_as_rows(ds)
    log.info("wrote %s: %.1f MB, %d examples x %d rows (sites, heads) x %d layers", out, len(page.encode()) / 1e6,
             rows.sizes["example"], rows.sizes["site"], rows.sizes["layer"])


def explorer_html(ds, pairs):
    """The explorer page of a divergence dataset and its pairs dataset, as one HTML string."""
    ds = with_heads_as_rows(ds)
    pairs = checked_pairs(ds, pairs)
    top = top_tokens(ds, pairs)
    header, arrays = page_data(ds, pairs, top)
    return PAGE.format(
        title=html.escape(f"patchmap explorer: {ds.attrs.get('run', '')}"),
        css=(HERE / "explorer.css").read_text(encoding="utf-8"),
        run=html.escape(str(ds.attrs.get("run", ""))),
        summary=html.escape(run_summary(ds)),
        notices="".join(f'<p class="notice">{html.escape(text)}</p>' for text in notices(ds)),
        top_notice="" if top else f'<p id="top-notice" class="notice">{html.escape(NO_TOP_TOKENS)}</p>',
        plotly=plotly_js_packed(),
        data=packed(header, arrays),
        js=(HERE / "explorer.js").read_text(encoding="utf-8"),
    )


# the variables of a heatmap row (a site, or a head of a head site)
ROW_VARIABLES = (*METRICS, *(f"{m}_mean" for m in METRICS), "js_ci_low", "js_ci_high", "top_token", "top_prob")
ROW_COORDS = ("component", "positions")


def with_heads_as_rows(ds):
    """A run's results with its head sites' heads as rows of the site x layer heatmap, after its other
    sites: head h of head site "Heads@last" is the row "Heads@last h", so a head site shows as a head x layer
    block (patchmap.heads stores head sites along `head_site`, in variables prefixed head_)."""
    if "head_site" not in ds.dims:
        return ds
    blocks = [ds[[v for v in ROW_VARIABLES if v in ds]].reset_coords(drop=True)] if "site" in ds.dims else []
    for head_site in ds["head_site"].values:
        one = ds.sel(head_site=head_site)
        block = xr.Dataset({v: one[f"head_{v}"] for v in ROW_VARIABLES if f"head_{v}" in ds}).reset_coords(drop=True)
        block = block.rename(head="site").assign_coords(site=[f"{head_site} {h}" for h in ds["head"].values])
        blocks.append(block)
    rows = xr.concat(blocks, dim="site", join="exact") if len(blocks) > 1 else blocks[0]
    rows = rows.transpose("example", "site", "layer", ...)
    details = {c: [str(v) for v in ds[c].values] if "site" in ds.dims and c in ds.coords else [] for c in ROW_COORDS}
    for c in ROW_COORDS:
        for head_site in ds["head_site"].values:
            value = str(ds[f"head_{c}"].sel(head_site=head_site).values) if f"head_{c}" in ds.coords else ""
            details[c] += [f"{value} {h}" if c == "component" else value for h in ds["head"].values]
    rows = rows.assign_coords({c: ("site", details[c]) for c in ROW_COORDS})
    kept = ds[[v for v in ds.data_vars if v not in ROW_VARIABLES and not v.startswith("head_")
               and "site" not in ds[v].dims]]
    out = rows.merge(kept.drop_dims([d for d in ("site", "head_site", "head") if d in kept.dims]), join="exact")
    for v in METRICS:
        out[v].attrs = (ds[v] if v in ds else ds[f"head_{v}"]).attrs
    out.attrs = ds.attrs
    return out


def checked_pairs(ds, pairs):
    """pairs.nc in divergence.nc's example order, after checking that both hold what the page reads."""
    missing = [n for n in (*METRICS, "js_ci_low", "js_ci_high", *EXAMPLE_COORDS) if n not in ds.variables]
    if missing:
        raise UserError(f"divergence.nc lacks {', '.join(missing)}: is it a patchmap divergence.nc?")
    for name in METRICS:
        if set(ds[name].dims) != {"example", "site", "layer"}:
            raise UserError(f"divergence.nc's {name} has dimensions {ds[name].dims}, not (example, site, layer)")
    if ds.sizes["example"] == 0 or ds.sizes["site"] == 0 or ds.sizes["layer"] == 0:
        raise UserError(f"divergence.nc holds no numbers ({ds.sizes['example']} examples, {ds.sizes['site']} "
                        f"sites, {ds.sizes['layer']} layers)")
    missing = [n for n in PAIRS_VARIABLES if n not in pairs.variables]
    if missing:
        raise UserError(f"pairs.nc lacks {', '.join(missing)}: is it a patchmap pairs.nc?")
    ids = [str(i) for i in ds["example"].values]
    if len(set(ids)) != len(ids) or set(ids) != {str(i) for i in pairs["example"].values}:
        raise UserError("pairs.nc's examples are not divergence.nc's: are they of the same run?")
    pairs = pairs.sel(example=ds["example"].values)
    if not (pairs["target_prompt"].values.astype(str) == ds["target_prompt"].values.astype(str)).all():
        raise UserError("pairs.nc's target prompts are not divergence.nc's: are they of the same run?")
    if ds.attrs.get("intervention") == "noise" and "noise_seed" not in pairs.variables:
        raise UserError("pairs.nc of a noise run lacks noise_seed")
    return pairs


def top_tokens(ds, pairs):
    """The run's top tokens checked against the contract (TOP_TOKENS), as the token table of the page: {"ids":
    every token id used, ascending, "texts": their texts}; None for a run made before they were stored."""
    present = [name for name in TOP_TOKENS if name in ds.variables]
    if not present:
        return None
    missing = [name for name in TOP_TOKENS if name not in ds.variables]
    if missing:
        raise UserError(f"divergence.nc holds {', '.join(present)} but not {', '.join(missing)}")
    for name, (dims, kinds) in TOP_TOKENS.items():
        if set(ds[name].dims) != set(dims) or ds[name].dtype.kind not in kinds:
            raise UserError(f"divergence.nc's {name} is {ds[name].dtype} {ds[name].dims}; expected {dims} of "
                            f"{'integers' if kinds == 'i' else 'floats' if kinds == 'f' else 'strings'}")
    for name in ("top_prob", "target_top_prob"):
        probs = ds[name].transpose(..., "rank").values
        if (np.diff(probs, axis=-1) > 0).any() or (probs < 0).any() or (probs > 1).any():
            raise UserError(f"divergence.nc's {name} is not probabilities from most to least likely")
    ids = np.asarray(ds["token_id"].values, dtype=np.int64)
    used = np.unique(np.concatenate([ds["top_token"].values.ravel(), ds["target_top_token"].values.ravel(),
                                     pairs["target_answer"].values, pairs["source_answer"].values]))
    unknown = np.setdiff1d(used, ids)
    if unknown.size:
        raise UserError(f"divergence.nc's token_text lacks the text of {unknown.size} token id(s): "
                        f"{', '.join(map(str, unknown[:5]))}{' ...' if unknown.size > 5 else ''}")
    texts = ds["token_text"].sel(token_id=used).values
    return {"ids": used.tolist(), "texts": [str(t) for t in texts]}


def notices(ds):
    """One line for each thing in the run that the page cannot show as usual."""
    lines = []
    if ds.sizes["example"] == 1:
        lines.append("this run has one example: each cell's mean is that example's value, with no interval")
    for site in ds["site"].values:
        empty = [name for name in METRICS if not np.isfinite(ds[name].sel(site=site).values).any()]
        if empty:
            lines.append(f"site '{site}' has no finite values of {', '.join(empty)}: its row is empty")
    for name in METRICS:
        live = [s for s in ds["site"].values if np.isfinite(ds[name].sel(site=s).values).any()]
        values = ds[name].sel(site=live).values
        bad = int((~np.isfinite(values)).sum())
        if bad:
            lines.append(f"not finite (NaN or infinite): {bad} of {values.size} values of {name}; means and n "
                         "leave them out")
    return lines


def run_summary(ds):
    a = ds.attrs
    return (f"model {a.get('model', '?')}, {provenance.method(a) if 'intervention' in a else '?'}, dataset "
            f"{a.get('dataset', '?')}: {ds.sizes['example']} examples, {ds.sizes['site']} rows (sites, or heads of "
            f"head sites) x {ds.sizes['layer']} layers")


def subject_span(prompt, subject):
    """[start, end) characters of the subject in the prompt: the first occurrence with no letter or digit
    on either side (as patchmap.data prefers one on token boundaries), else the first; None if absent."""
    if not subject:
        return None
    found = (re.search(rf"(?<!\w){re.escape(subject)}(?!\w)", prompt) or re.search(re.escape(subject), prompt))
    return list(found.span()) if found else None


def source_note(ds, pairs):
    """What takes the source prompt's place under interventions that patch in no other prompt."""
    a = ds.attrs
    window = f", in the {a['window']} layers around each layer" if int(a.get("window", 1)) > 1 else ""
    if a.get("intervention") == "noise":
        return (f"the clean prompt; the target is the same prompt with Gaussian noise of std "
                f"{float(pairs.attrs.get('noise_std', np.nan)):.4g} ({a.get('noise_scale')} x the subject "
                f"embeddings' std) added to its subject's embeddings{window}")
    if a.get("intervention") == "ablate":
        value = "its mean over the run's examples" if a.get("ablation_value") == "mean" else "zero"
        return f"no prompt: the site's activation is replaced by {value}{window}"
    if a.get("intervention") == "knockout":
        return f"no prompt: the last position's attention to the site's positions is blocked{window}"
    return None


def page_data(ds, pairs, top):
    """(header, arrays): what explorer.js reads. header is plain JSON; arrays are numpy arrays (C order)."""
    ds = ds.transpose("example", "site", "layer", ...)
    strings = {name: [str(v) for v in ds[name].values] for name in EXAMPLE_COORDS}
    note = source_note(ds, pairs)
    examples = {
        "id": [str(v) for v in ds["example"].values], **strings,
        "target_span": [subject_span(p, str(s)) for p, s in zip(strings["target_prompt"], pairs["target_subject"].values)],
        "source_span": [subject_span(p, str(s)) for p, s in zip(strings["source_prompt"], pairs["source_subject"].values)],
    }
    if ds.attrs.get("intervention") == "noise":
        examples["noise_seed"] = [str(int(s)) for s in pairs["noise_seed"].values]  # beyond JS's exact integers
    header = {
        "run": str(ds.attrs.get("run", "")), "intervention": str(ds.attrs.get("intervention", "swap")),
        "source_note": note, "sites": [str(s) for s in ds["site"].values],
        "site_details": [f"{c} at {p}" for c, p in zip(ds["component"].values, ds["positions"].values)]
        if "component" in ds.coords and "positions" in ds.coords else None,
        "layers": [int(l) for l in ds["layer"].values],
        "metrics": [{"name": n, "label": LABELS[n], "description": DESCRIPTIONS[n], "unit": ds[n].attrs.get("units", "")}
                    for n in METRICS],
        "bootstrap": {"low": finite_lists(ds["js_ci_low"]), "high": finite_lists(ds["js_ci_high"])},
        "examples": examples, "tokens": None if top is None else {"ids": top["ids"], "texts": top["texts"]},
    }
    arrays = {name: ds[name].values.astype(np.uint8 if name == "flip" else np.float32) for name in METRICS}
    arrays["p_target_unpatched"] = pairs["target_p_answer"].values.astype(np.float32)
    if top is not None:
        lookup = token_rows(top)
        arrays.update(top_index=lookup(ds["top_token"].values), top_prob=ds["top_prob"].values.astype(np.float32),
                      target_top_index=lookup(ds["target_top_token"].values),
                      target_top_prob=ds["target_top_prob"].values.astype(np.float32),
                      target_answer_index=lookup(pairs["target_answer"].values),
                      source_answer_index=lookup(pairs["source_answer"].values))
    return header, arrays


def token_rows(top):
    """A function from token ids (any shape) to their rows of the token table, in the smallest unsigned type."""
    ids = np.asarray(top["ids"], dtype=np.int64)
    dtype = np.uint16 if len(ids) <= 1 << 16 else np.uint32
    return lambda values: np.searchsorted(ids, np.asarray(values, dtype=np.int64)).astype(dtype)


def finite_lists(array):
    """A (site, layer) array as nested lists, non-finite values as None (JSON has no NaN)."""
    return [[float(v) if np.isfinite(v) else None for v in row] for row in array.transpose("site", "layer").values]


def packed(header, arrays):
    """The page's data as base64 of one deflated byte string: [header length, uint32 little-endian][header
    JSON][arrays]. Each array is stored as byte planes (every value's first byte, then every second byte, ...),
    which deflate packs tighter than interleaved floats; header["arrays"] gives each one's dtype, shape and
    offset from the end of the header."""
    specs, planes, offset = {}, [], 0
    for name, array in arrays.items():
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        data = array.view(np.uint8).reshape(-1, array.itemsize).T.tobytes()
        specs[name] = {"dtype": array.dtype.name, "shape": list(array.shape), "offset": offset}
        planes.append(data)
        offset += len(data)
    head = json.dumps({**header, "arrays": specs}, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    head = head.encode("utf-8")
    return base64.b64encode(zlib.compress(len(head).to_bytes(4, "little") + head + b"".join(planes), 6)).decode()


PLOTLY_JS = Path(__file__).parent / "vendor" / "plotly-cartesian.min.js"
PLOTLY_JS_SHA256 = "79542150855a52c567260e3137095dbe2b744e6d702a5cabe67da246942fba7a"  # plotly.js 4.1.1


@lru_cache(maxsize=1)
def plotly_js_packed():
    """plotly.js (PLOTLY_JS), deflated and base64-encoded (1.5 MB of script: about 0.6 MB)."""
    return base64.b64encode(zlib.compress(PLOTLY_JS.read_bytes(), 6)).decode()


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<header>
<h1>patchmap explorer: run <code>{run}</code></h1>
<p class="summary">{summary}</p>
</header>
<div id="notices">{notices}</div>
<p id="status" class="status">Unpacking the run's numbers…</p>
<noscript><p class="notice">This page needs JavaScript to draw the run's numbers.</p></noscript>
<main id="app" hidden>
<form id="controls" onsubmit="return false">
<label>Metric <select id="metric"></select></label>
<label>Relation <select id="relation"></select></label>
<label>Examples containing <input id="text" type="search" placeholder="text in a prompt, answer or id"></label>
<span id="chosen"></span>
</form>
<div id="heatmap" class="plot"></div>
<p class="hint">Hover a cell for its mean, 95% interval and number of examples; click it to list its examples.</p>
<div id="line" class="plot"></div>
<section id="examples">
<h2 id="cell-title">Click a cell of the heatmap to list its examples</h2>
{top_notice}
<table id="example-table" hidden><thead></thead><tbody></tbody></table>
</section>
<details>
<summary>How the numbers are computed</summary>
<p>Each cell is the mean of the chosen metric over the chosen examples whose value is finite; n counts them.
Flip rate is the mean of flip (1 if the patched run's top token is the source's answer). The 95% interval is,
for JS over all examples, divergence.nc's bootstrap interval (js_ci_low, js_ci_high: 1,000 resamples of the
examples), as in lines.png; for the flip rate, Wilson's score interval; otherwise mean ± 1.96 · sd / √n
(sd with n − 1), the normal approximation, which needs n ≥ 2. Filters choose the examples: the relation,
and text in the example's id, prompts or answers.</p>
<p>p(target answer) unpatched is pairs.nc's target_p_answer: the model's probability of the target's
answer on the target prompt (for noise runs, the clean prompt). Values are the files' float32 numbers, shown
to 4 significant digits.</p>
</details>
</main>
<script type="application/octet-stream" id="plotly-js">{plotly}</script>
<script type="application/octet-stream" id="run-data">{data}</script>
<script>{js}</script>
</body>
</html>
"""
