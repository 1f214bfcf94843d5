"""The extract and patch stages on in-memory objects: the workflow and the Python API both call these."""

import logging

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from .engine import capture, is_out_of_memory, pad_batch, patch_batch
from .errors import UserError
from .metrics import METRICS
from .models import input_device
from .pairs import token_lists
from .sites import positions

log = logging.getLogger(__name__)


def site_positions(ds, site):
    """Token positions of `site` in each example (identical in target and source)."""
    return [positions(site.positions, int(n), int(a), int(b))
            for n, a, b in zip(ds["length"].values, ds["subject_start"].values, ds["subject_end"].values)]


def _batches(n, batch_size):
    return [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


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
    for a, b in tqdm(_batches(n, batch_size), desc="extract", unit="batch", disable=not progress):
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


def _source_values(acts, site, pos, width, hidden, a, b):
    """[B, T, H] tensors per extracted layer with the source activation at each example's site positions."""
    arr = acts[f"act_{site.name}"].values[a:b]  # [B, layer, slot, H]
    values = {}
    for li, layer in enumerate(acts["layer"].values.tolist()):
        v = torch.zeros(b - a, width, hidden)
        for i, ps in enumerate(pos[a:b]):
            v[i, ps] = torch.from_numpy(arr[i, li, :len(ps)])
        values[layer] = v
    return values


def target_noise(pairs, a, b, width, hidden):
    """[B, T, H] Gaussian noise at the subject positions of examples a..b (noise intervention), else None."""
    if pairs.attrs.get("intervention") != "noise":
        return None
    noise = torch.zeros(b - a, width, hidden)
    for i in range(a, b):
        start, end = int(pairs["subject_start"].values[i]), int(pairs["subject_end"].values[i])
        generator = torch.Generator().manual_seed(int(pairs["noise_seed"].values[i]))
        noise[i - a, start:end] = torch.randn(end - start, hidden, generator=generator) * pairs.attrs["noise_std"]
    return noise.to(torch.float32)


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


@torch.no_grad()
def patch_site(model, pairs, acts, site, layers, batch_size, pad_id, base=2.0, progress=True, window=1):
    """Per-example metrics [example, layer] for one site: the source activation patched into the target
    (or, for the knockout intervention, the last position's attention to the site's positions blocked),
    in the `window` layers around each layer."""
    knockout = pairs.attrs.get("intervention") == "knockout"
    targets = token_lists(pairs, "target_ids")
    pos = site_positions(pairs, site)
    n, hidden = len(targets), model.config.hidden_size
    results = {k: [] for k in METRICS}

    def run(a, b):
        width = max(len(t) for t in targets[a:b])
        values = None if knockout else _source_values(acts, site, pos, width, hidden, a, b)
        noise = target_noise(pairs, a, b, width, hidden)
        return patch_batch(model, site, layers, targets[a:b], pos[a:b], values,
                           pairs["target_answer"].values[a:b], pairs["source_answer"].values[a:b],
                           pad_id, base, None if noise is None else noise.to(input_device(model)),
                           window=window, knockout=knockout)

    for a, b in tqdm(_batches(n, batch_size), desc=f"patch {site.label}", unit="batch", disable=not progress):
        metrics = _halving_on_out_of_memory(run, a, b, site)
        for k, v in metrics.items():
            results[k].append(v.numpy())
    dims = ("example", "layer")
    data = {k: (dims, np.concatenate(v) if v else np.zeros((0, len(layers)), np.float32), {"description": METRICS[k]})
            for k, v in results.items()}
    ds = xr.Dataset(data, coords={"example": pairs["example"].values, "layer": np.asarray(layers)})
    ds.attrs.update({"site": site.name, "label": site.label, "component": site.component,
                     "positions": site.positions, "js_base": base, "window": window})
    return ds


def _halving_on_out_of_memory(run, a, b, site):
    """run(a, b); on out-of-memory (CUDA or CPU), log it and run the two halves of the batch instead."""
    try:
        return run(a, b)
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        if b - a == 1:
            raise UserError(f"out of memory patching one example ({a}) at site {site.label}; use a smaller "
                            "model or dtype, or another device") from None
        log.warning("out of memory patching examples %d-%d at site %s (%s); retrying in halves",
                    a, b - 1, site.label, str(error).splitlines()[0][:200])
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mid = (a + b) // 2
    halves = [_halving_on_out_of_memory(run, a, mid, site), _halving_on_out_of_memory(run, mid, b, site)]
    return {k: torch.cat([h[k] for h in halves]) for k in halves[0]}


ENGINES = ("fast", "reference")


def _check_knockout(pairs, sites):
    """A knockout that blocks every key of the last token leaves its attention undefined (softmax over
    nothing): stop with a clear error instead of returning whatever the kernel makes of it."""
    for site in sites:
        for example, ps, n in zip(pairs["example"].values, site_positions(pairs, site), pairs["length"].values):
            if len(ps) == int(n):
                raise UserError(f"knockout at site {site.label} ({site.positions}) blocks every token the last "
                                f"token attends to (example {example}), which leaves its attention undefined; "
                                "use a position group that keeps some, e.g. non_subject")


def patch(model, pairs, acts, sites, layers, batch_size, pad_id, base=2.0, progress=True, engine="fast",
          window=1, **options):
    """{site name: per-example metrics [example, layer]} for each site, by the chosen engine: `fast`
    (patchmap.fast: many runs per block call, no recomputation a patch cannot change; `options` go to
    it, e.g. max_tokens) or `reference` (patch_site: hooks on one full forward per layer). The fast
    engine covers every intervention (swap, noise, ablate, knockout) with any window."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine '{engine}'; known: {', '.join(ENGINES)}")
    if pairs.attrs.get("intervention") == "knockout":
        _check_knockout(pairs, sites)
    if engine == "reference":
        return {s.name: patch_site(model, pairs, acts, s, layers, batch_size, pad_id, base, progress, window)
                for s in sites}
    from .fast import patch_sites
    return patch_sites(model, pairs, acts, sites, layers, batch_size, pad_id, base, progress, window, **options)
