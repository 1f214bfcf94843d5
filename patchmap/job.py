"""The patch job: everything the patch stage computes from, handed to either engine (patchmap.patching),
and the one builder of its per-site result."""

from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from . import heads
from .interventions import Intervention
from .quantities import DESCRIPTIONS, METRICS, TOP_DESCRIPTIONS, TOP_K
from .stacking import stacked


def window_layers(layer: int, window: int, n_layers: int) -> list:
    """The layers patched together for `layer`: [layer - window//2, layer - window//2 + window), clipped."""
    start = layer - window // 2
    return list(range(max(start, 0), min(start + window, n_layers)))


def touched_layers(layers: list, window: int, n_layers: int) -> list:
    """Every layer that the patch window of some layer in `layers` touches (where sources are needed)."""
    return sorted({k for layer in layers for k in window_layers(layer, window, n_layers)})


def batches(n: int, batch_size: int) -> list:
    """(a, b): the examples a..b - 1 of each batch of `batch_size` out of n."""
    return [(a, min(a + batch_size, n)) for a in range(0, n, batch_size)]


@dataclass
class PatchJob:
    """Patch every site in `sites` at every layer in `layers`, for every example of `pairs`, with
    `intervention` (its strategy says what a patched run does at a site).

    `sources`: the source activations (the intervention's `sources`: extracted, or the ablation values
    broadcast to every example), None for an intervention that writes none (knockout). `window`: each
    layer's run patches window_layers(layer, window). `js_base`: 2 or e. Batches hold `batch_size`
    examples, padded with `pad_id`."""
    model: Any
    pairs: xr.Dataset
    sites: list
    layers: list
    batch_size: int
    pad_id: int
    intervention: Intervention
    sources: Any = None
    js_base: float = 2.0
    window: int = 1
    progress: bool = True

    @property
    def n_examples(self) -> int:
        return self.pairs.sizes["example"]

    def batches(self) -> list:
        return batches(self.n_examples, self.batch_size)

    def empty_results(self) -> dict:
        """The arrays a site's results fill: {metric: [example, layer]}, top_token and top_prob [example, layer,
        rank], target_top_token and target_top_prob [example, rank]."""
        n, layers = self.n_examples, len(self.layers)
        out = {k: np.zeros((n, layers), np.int8 if k == "flip" else np.float32) for k in METRICS}
        out.update(top_token=np.zeros((n, layers, TOP_K), np.int32), top_prob=np.zeros((n, layers, TOP_K), np.float32),
                   target_top_token=np.zeros((n, TOP_K), np.int32), target_top_prob=np.zeros((n, TOP_K), np.float32))
        return out

    def site_result(self, site, metrics: dict) -> xr.Dataset:
        """One site's per-example results (empty_results' arrays, filled) as the dataset both engines
        return (for a head site: one per head, which stack_heads stacks)."""
        data = {k: (("example", "layer"), metrics[k], {"description": DESCRIPTIONS[k]}) for k in METRICS}
        for k in ("top_token", "top_prob"):
            data[k] = (("example", "layer", "rank"), metrics[k], {"description": TOP_DESCRIPTIONS[k]})
        for k in ("target_top_token", "target_top_prob"):
            data[k] = (("example", "rank"), metrics[k], {"description": TOP_DESCRIPTIONS[k]})
        ds = xr.Dataset(data, coords={"example": self.pairs["example"].values, "layer": np.asarray(self.layers),
                                      "rank": np.arange(TOP_K)})
        ds.attrs.update({"site": site.name, "label": site.label, "component": site.component,
                         "positions": site.positions, "js_base": self.js_base, "window": self.window})
        return ds


def stack_heads(per_head: list) -> xr.Dataset:
    """A head site's result from its heads' (site_result of each, in head order): metrics [example, layer,
    head], with the `head` coordinate (0 = the first query head)."""
    ds = stacked(per_head, "head", combine_attrs="override").transpose("example", "layer", "head", ...)
    ds = ds.assign_coords(head=np.arange(len(per_head)))
    ds["head"].attrs["description"] = heads.HEAD
    return ds
