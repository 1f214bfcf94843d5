"""The Python API for notebooks: the workflow's engine on a model, tokenizer and facts in memory.

    from patchmap.api import patch_heatmap
    ds = patch_heatmap(model, tokenizer, facts, sites={"subj": {"label": "Subj.", "component": "resid",
                                                                  "positions": "subject"}})
    ds["js_mean"].to_pandas()
"""

import math

from . import models, patching
from .aggregate import merge_sites
from .config import resolve_layers
from .engine import window_layers
from .pairs import make_pairs
from .provenance import package_versions
from .sites import Site

DEFAULT_SITES = {
    "subj": {"label": "Subj.", "component": "resid", "positions": "subject"},
    "attn": {"label": "Attn.", "component": "attn", "positions": "last"},
    "last": {"label": "Last.", "component": "resid", "positions": "last"},
}


def patch_heatmap(model, tokenizer, facts, sites=None, layers="all", examples=100, seed=0, batch_size=32,
                  js_base=2, known_only=True, intervention="swap", noise_scale=3.0, value="mean", window=1,
                  progress=True, engine="fast"):
    """Pair the facts, patch every site at every layer, and return the dataset that the workflow writes
    as divergence.nc (without the file provenance): js (example, site, layer), js_mean, js_ci_low, ...
    `engine` is "fast" (the default) or "reference", as in a run's config."""
    sites = [s if isinstance(s, Site) else Site.from_config(name, s)
             for name, s in (sites or DEFAULT_SITES).items()]
    base = math.e if js_base == "e" else float(js_base)
    layers = resolve_layers(layers, models.n_layers(model))
    pairs = make_pairs(model, tokenizer, facts, examples, seed, known_only, batch_size=batch_size,
                       intervention=intervention, noise_scale=noise_scale)
    extracted = sorted({w for l in layers for w in window_layers(l, window, models.n_layers(model))})
    acts = (None if intervention == "knockout" else  # knockout patches no activations in
            patching.extract_activations(model, pairs, sites, extracted, batch_size, tokenizer.pad_token_id, progress))
    if intervention == "ablate":
        acts = patching.broadcast_ablation(patching.ablation_values([acts], sites, value), pairs)
    per_site = patching.patch(model, pairs, acts, sites, layers, batch_size, tokenizer.pad_token_id, base,
                              progress, engine=engine, window=window)
    ds = merge_sites(per_site, sites, base, seed)
    ds.attrs.update({k: v for k, v in pairs.attrs.items()})
    ds.attrs.update({"model": getattr(model.config, "_name_or_path", ""), "js_base": str(js_base)})
    ds.attrs.update({f"version_{k}": v for k, v in package_versions().items()})
    return ds
